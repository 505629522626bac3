"""Persistence: the SQL store and blob storages for attachment bytes. No Flask."""
