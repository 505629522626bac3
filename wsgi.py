"""WSGI entry point for the demo app: ``gunicorn -c gunicorn.conf.py wsgi:app``."""

from example import create_app

app = create_app()
