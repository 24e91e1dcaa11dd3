"""The example Flask app (examples/flask_app/) three ways, as real servers: (a) alone under
`flask run`, (b) mounted unchanged under `chatbot serve` (WSGI_APP), (c) ported to a Quart
blueprint on chatbot's app (`chatbot serve ported:app`). The same requests get the same status
codes, bodies, redirects and session cookies from all three, and one login works on both sides.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.sessions import SecureCookieSessionInterface

from tests.support.frames import reply_over
from tests.support.procs import ROOT, ChatbotProcess, Process, _wait_port, free_port

EXAMPLE = ROOT / "examples" / "flask_app"
SECRET_KEY = "example-secret-key-0123456789abcdef"
CALL_TIMEOUT_S = 15.0
COMMON_ENV = {"SECRET_KEY": SECRET_KEY, "DEMO_WORD_DELAY_S": "0", "LOG_FORMAT": "text"}


@dataclass
class Step:
    method: str
    path: str
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None


UPLOAD = b"line one\nline two\n" * 100
STEPS = [
    Step("GET", "/"),  # not logged in: redirected to the login form, a flash in the session
    Step("GET", "/login?next=/"),
    Step("POST", "/login?next=/", {"name": "ada", "password": "wrong"}),
    Step("GET", "/api/notes"),  # the API says 401 instead of redirecting
    Step("POST", "/login?next=/", {"name": "ada", "password": "lovelace"}),
    Step("GET", "/"),
    Step("GET", "/api/notes?q=PORT&limit=2"),
    Step("GET", "/api/notes?limit=0"),
    Step("GET", "/api/notes?limit=many"),  # request.args type=int: a bad value is the default
    Step("POST", "/upload", files={"file": ("notes.txt", UPLOAD, "text/plain")}),
    Step("POST", "/upload", data={"nothing": "here"}),
    Step("POST", "/upload", files={"file": ("big.bin", b"x" * (2 * 1024 * 1024), "a/b")}),
    Step("GET", "/no/such/page"),
    Step("POST", "/logout"),
    Step("GET", "/login"),
    Step("GET", "/"),
]


class FlaskRun(Process):
    """`flask --app legacy run`: the example as its authors ran it."""

    def __init__(self) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "flask", "--app", "legacy", "run", "--port", str(self.port)]
        super().__init__("flask-run", argv, {"SECRET_KEY": SECRET_KEY}, cwd=EXAMPLE)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FlaskRun:
        self.spawn()
        assert self.proc is not None
        _wait_port(self.port, self.proc, self.log, 20.0)
        return self


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Any]]:
    started: dict[str, Any] = {}
    try:
        started["flask"] = FlaskRun().start()
        started["mounted"] = ChatbotProcess(
            {**COMMON_ENV, "WSGI_APP": "legacy:app", "CHAT_PAGE_PATH": "/assistant/"},
            name="mounted",
            cwd=EXAMPLE,
        ).start()
        started["ported"] = ChatbotProcess(
            {**COMMON_ENV, "CHAT_PAGE_PATH": "/assistant/"},
            name="ported",
            args=("ported:app",),
            cwd=EXAMPLE,
        ).start()
        yield started
    finally:
        for server in started.values():
            server.stop()


def session_of(response: httpx.Response) -> dict[str, Any] | None:
    """The session the response sets: its cookie attributes and its decoded content."""
    cookies = response.headers.get_list("set-cookie")
    if not cookies:
        return None
    assert len(cookies) == 1, cookies
    pair, _, attributes = cookies[0].partition(";")
    name, _, value = pair.partition("=")
    signer = Flask("decoder")
    signer.secret_key = SECRET_KEY
    serializer = SecureCookieSessionInterface().get_signing_serializer(signer)
    assert serializer is not None
    content = serializer.loads(value) if value else {}
    return {"name": name, "attributes": attributes.strip(), "content": content}


async def run_steps(url: str) -> list[dict[str, Any]]:
    seen = []
    async with httpx.AsyncClient(base_url=url, timeout=CALL_TIMEOUT_S) as client:
        for step in STEPS:
            response = await client.request(
                step.method, step.path, data=step.data, files=step.files
            )
            seen.append(
                {
                    "step": f"{step.method} {step.path}",
                    "status": response.status_code,
                    "type": response.headers.get("content-type"),
                    "location": response.headers.get("location"),
                    "body": response.text,
                    "session": session_of(response),
                }
            )
    return seen


async def test_the_same_requests_get_the_same_answers_from_flask_mounted_and_ported(
    servers: dict[str, Any],
) -> None:
    results = {name: await run_steps(server.url) for name, server in servers.items()}
    flask = results["flask"]
    # The script exercises what it says it does (against plain Flask).
    assert [r["status"] for r in flask] == [
        302,
        200,
        401,
        401,
        302,
        200,
        200,
        400,
        200,
        200,
        400,
        413,
        404,
        302,
        200,
        302,
    ]
    assert flask[0]["location"] == "/login?next=/" and flask[4]["location"] == "/"
    assert "Please log in" in flask[1]["body"] and "Hello, ada" in flask[5]["body"]
    assert json.loads(flask[6]["body"])["notes"] == ["Port /api/notes to Quart"]
    assert json.loads(flask[9]["body"])["sha256"] == hashlib.sha256(UPLOAD).hexdigest()
    assert flask[4]["session"]["content"]["_user_id"] == "ada"
    assert "You are logged out." in flask[14]["body"]
    for name in ("mounted", "ported"):
        for expected, got in zip(flask, results[name], strict=True):
            assert got == expected, f"{name} differs from flask on {expected['step']}"


async def test_one_login_works_on_both_sides_while_routes_move(servers: dict[str, Any]) -> None:
    """SECRET_KEY is the Flask app's key: the Quart port reads the cookie Flask wrote, and back."""
    form = {"name": "ada", "password": "lovelace"}
    for there, back in (("flask", "ported"), ("ported", "mounted")):
        async with httpx.AsyncClient(timeout=CALL_TIMEOUT_S) as client:
            login = await client.post(servers[there].url + "/login", data=form)
            assert login.status_code == 302, login.text
            home = await client.get(servers[back].url + "/")
            assert home.status_code == 200, (there, back, home.text)
            assert "Hello, ada" in home.text


async def test_the_mounted_app_serves_chat_beside_the_legacy_routes(
    servers: dict[str, Any],
) -> None:
    server = servers["mounted"]
    async with httpx.AsyncClient(base_url=server.url, timeout=CALL_TIMEOUT_S) as client:
        page = await client.get("/assistant/")
        assert page.status_code == 200 and 'src="static/app.js"' in page.text
        script = await client.get("/assistant/static/app.js")
        assert script.status_code == 200 and "connection.start()" in script.text
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/metrics")).status_code == 200
        legacy_root = await client.get("/")
        assert legacy_root.status_code == 302  # the legacy app's own `/`, not the chat page
        chat = await client.post("/assistant/chat", json={"message": "hello there"})
        assert chat.status_code == 200 and "hello there" in chat.json()["response"]
    reply, _ = await reply_over(server.url.replace("http", "ws") + "/ws", "hi")
    assert "hi" in reply
