"""Small WSGI (Flask) apps that tests mount with WSGI_APP=tests.support.legacy_apps:NAME."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

from flask import Flask, Response, jsonify, request, session

SLOW_VIEW_S = float(os.environ.get("LEGACY_SLOW_VIEW_S", "2"))
STARTED = "legacy slow view started"  # printed, so a test can see a view is running

app = Flask(__name__)
app.secret_key = "legacy-test-secret-key-0123456789"
running = {"now": 0, "most": 0, "echoed": 0}
_lock = threading.Lock()


@app.get("/")
def home() -> str:
    return "legacy home"


@app.route("/echo", methods=["GET", "POST", "PUT"])
def echo() -> Response:
    body = request.get_data(parse_form_data=True)
    running["echoed"] += 1
    return jsonify(
        method=request.method,
        path=request.path,
        args=request.args.to_dict(flat=False),
        cookies=request.cookies.to_dict(),
        remote_addr=request.remote_addr,
        body_bytes=len(body),
        form=request.form.to_dict(),
        thread=threading.current_thread().name,
    )


@app.get("/slow")
def slow() -> Response:
    with _lock:
        running["now"] += 1
        running["most"] = max(running["most"], running["now"])
    print(STARTED, flush=True)
    try:
        time.sleep(float(request.args.get("s", SLOW_VIEW_S)))  # blocking, as legacy views are
    finally:
        with _lock:
            running["now"] -= 1
    return jsonify(slept=True, most=running["most"])


@app.get("/stream")
def stream() -> Response:
    def pieces() -> Iterator[str]:
        for n in range(3):
            yield f"piece {n}\n"

    return Response(pieces(), mimetype="text/plain")


released = threading.Event()


@app.get("/held-stream")
def held_stream() -> Response:
    """Yields a piece, then holds the rest until GET /release: a streamed response."""

    def pieces() -> Iterator[str]:
        yield "first piece\n"
        released.wait(30)
        released.clear()
        yield "the rest\n"

    return Response(pieces(), mimetype="text/plain")


@app.get("/counts")
def counts() -> Response:
    return jsonify(running)


@app.get("/release")
def release() -> str:
    released.set()
    return "released"


@app.get("/fail")
def fail() -> str:
    raise RuntimeError("legacy view failed")


@app.post("/login")
def login() -> Response:
    session["user"] = request.form["user"]
    return jsonify(ok=True)


@app.get("/whoami")
def whoami() -> Response:
    return jsonify(user=session.get("user"))


@app.errorhandler(404)
def not_found(error: object) -> tuple[str, int]:
    return "legacy 404 page", 404


def create_app(greeting: str = "hello") -> Flask:
    factory_app = Flask("factory")

    @factory_app.get("/greeting")
    def greet() -> str:
        return greeting

    return factory_app


def raw_app(environ: dict[str, object], start_response: object) -> list[bytes]:
    """A bare WSGI callable, no Flask."""
    start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
    return [b"raw ", str(environ["PATH_INFO"]).encode()]
