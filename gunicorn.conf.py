"""gunicorn settings for serving flask-chatkit (``make run``).

gevent workers: every open ChatKit stream is one cheap greenlet, so one worker holds
thousands of concurrent streams. Environment overrides:
  GUNICORN_BIND (e.g. 0.0.0.0:8000) or PORT, WEB_CONCURRENCY (workers),
  GUNICORN_TIMEOUT, GUNICORN_LOG_LEVEL.
"""

import os

_port = os.environ.get("PORT")
bind = os.environ.get("GUNICORN_BIND") or (f"0.0.0.0:{_port}" if _port else "127.0.0.1:8000")

worker_class = "gevent"
# One or two workers suit a small machine; each worker runs its own asyncio loop and
# database pool. Streams scale with worker_connections, not with workers.
workers = int(os.environ.get("WEB_CONCURRENCY") or min(2, os.cpu_count() or 1))
worker_connections = 2000

# gevent workers notify the arbiter from their own loop, so a long stream does not
# trip `timeout`; keep it modest so a truly stuck worker is still replaced.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
# On restart/shutdown, open streams get graceful_timeout - CHATKIT_CANCEL_TIMEOUT - 1 s
# to finish; the rest are then cancelled and saved (flask_chatkit/bridge/lifecycle.py).
graceful_timeout = 30
keepalive = 5

accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
# Forwarded headers are trusted only from these addresses (use ProxyFix in the app too).
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn >= 27 opens a control socket at one fixed path per user, so two servers on
# one machine (tests, several apps) would collide; off unless GUNICORN_CONTROL_SOCKET
# names a path. Older gunicorn ignores both settings.
control_socket_disable = not os.environ.get("GUNICORN_CONTROL_SOCKET")
if not control_socket_disable:
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
