"""async <-> sync: the per-process loop, streams, channels, native threads. No Flask."""
