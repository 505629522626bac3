"""The flask-chatkit protocol console: a dependency-free page shipped in the package."""

from __future__ import annotations

from importlib import resources

from flask import Response, url_for


def console_view() -> Response:
    html = resources.files("flask_chatkit").joinpath("web/static/console.html").read_text("utf-8")
    api_url = url_for("chatkit.endpoint")
    html = html.replace("__CHATKIT_API_URL__", api_url)
    return Response(html, mimetype="text/html")
