"""A streamed reply keeps the request's Flask contexts until it ends (web/response.py).

Flask 3.1 tears the app context down when the view returns unless something still
holds it; ``respond`` keeps running after that, so the streaming body holds both
contexts and gives them back exactly once: read to the end, or closed unread.
"""

from __future__ import annotations

from flask import Flask, Response
from flask.globals import _cv_app
from flask.testing import FlaskClient

from .helpers import login_as
from .http_client import create_request


def record_teardowns(app: Flask) -> list[str]:
    torn: list[str] = []

    @app.teardown_appcontext
    def app_gone(exc: BaseException | None) -> None:
        torn.append("app")

    @app.teardown_request
    def request_gone(exc: BaseException | None) -> None:
        torn.append("request")

    return torn


def test_teardown_runs_once_after_the_stream_is_read(app: Flask, client: FlaskClient) -> None:
    torn = record_teardowns(app)
    login_as(client, "alice")
    torn.clear()
    response = client.post("/chatkit", json=create_request("words=3"))
    assert response.mimetype == "text/event-stream"
    assert torn == []  # the view returned, yet the contexts live on for the stream
    chunks = list(response.response)  # read it all, as a WSGI server would
    assert b"thread.created" in b"".join(chunks)
    assert torn == ["request", "app"]  # once each, after the last write
    response.close()
    assert torn == ["request", "app"]  # closing afterwards tears down nothing twice


def test_a_body_closed_unread_still_gives_the_contexts_back(
    app: Flask, client: FlaskClient
) -> None:
    torn = record_teardowns(app)
    login_as(client, "alice")
    torn.clear()
    response = client.post("/chatkit", json=create_request("words=50 delay=0.05"))
    assert torn == []
    response.close()  # the client left before any byte was read
    assert torn == ["request", "app"]
    # The worker's thread is clean again: the next request gets fresh contexts.
    assert client.post("/chatkit", json={"type": "threads.list", "params": {}}).status_code == 200


def test_call_on_close_runs_once_after_the_stream(app: Flask, client: FlaskClient) -> None:
    """The response's close callbacks run once, when the stream ends, after its teardown."""
    torn = record_teardowns(app)

    @app.after_request
    def on_close(response: Response) -> Response:
        response.call_on_close(lambda: torn.append("closed"))
        return response

    login_as(client, "alice")
    torn.clear()
    response = client.post("/chatkit", json=create_request("words=3"))
    assert response.mimetype == "text/event-stream"
    assert b"thread.created" in b"".join(response.response)
    assert torn == ["request", "app", "closed"]  # at the stream's end, after its teardown
    response.close()  # what the WSGI server does after the last write
    assert torn == ["request", "app", "closed"]  # once
    unread = client.post("/chatkit", json=create_request("words=50 delay=0.05"))
    torn.clear()
    unread.close()  # a client gone before any byte
    assert torn == ["request", "app", "closed"]


def test_a_response_dropped_unread_gives_the_contexts_back(app: Flask, client: FlaskClient) -> None:
    """A test that never reads nor closes a stream leaves no context pushed behind it."""
    torn = record_teardowns(app)
    login_as(client, "alice")
    torn.clear()
    response = client.post("/chatkit", json=create_request("words=50 delay=0.05"))
    assert torn == []
    del response  # dropped: collected at once (no reference cycle holds the body)
    assert torn == ["request", "app"]
    assert _cv_app.get(None) is None
