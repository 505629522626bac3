"""A test app whose signal receivers append JSON lines to ``CHATKIT_TEST_SIGNAL_LOG``.

``gunicorn 'tests.signal_app:gunicorn_app()'``: the usage accounting a README
reader would write (who had which reply finished or cancelled), run for real.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flask import Flask, current_app

from flask_chatkit import signals

from .apps import gunicorn_app as base_app


def gunicorn_app() -> Flask:
    app = base_app()
    log_path = os.environ["CHATKIT_TEST_SIGNAL_LOG"]

    def record(name: str, context: Any, **fields: Any) -> None:
        line = {"signal": name, "user": context.user_id, "app": current_app.name, **fields}
        with open(log_path, "a") as log:
            log.write(json.dumps(line) + "\n")

    @signals.stream_finished.connect_via(app)
    def on_finished(sender: Flask, context: Any, events: int, **extra: Any) -> None:
        record("stream_finished", context, events=events)

    @signals.stream_cancelled.connect_via(app)
    def on_cancelled(sender: Flask, context: Any, events: int, **extra: Any) -> None:
        record("stream_cancelled", context, events=events)

    app.config["_signal_receivers"] = (on_finished, on_cancelled)  # keep them referenced
    return app
