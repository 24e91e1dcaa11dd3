"""WSGI_APP: a Flask app mounted unchanged behind chatbot's routes (chatbot/mount.py), and the
extension points of your own Quart app (CHAT_PAGE_PATH, SECRET_KEY, TEMPLATES_DIR, `protected`).

In-process through the ASGI app, except where a real server's behaviour is the point.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from quart import Blueprint, Quart, render_template, session

from chatbot import create_app, protected
from chatbot.errors import SettingsError
from chatbot.mount import WAITING_PER_THREAD, load_app
from chatbot.runtime import runtime_of
from chatbot.settings import Settings
from tests.support import legacy_apps
from tests.support.frames import reply_over
from tests.support.procs import ChatbotProcess

CALL_TIMEOUT_S = 15.0
LEGACY = "tests.support.legacy_apps"


@asynccontextmanager
async def serving(settings: Settings, app: Quart | None = None) -> AsyncIterator[Quart]:
    app = app or create_app(settings)
    async with asyncio.timeout(CALL_TIMEOUT_S), app.test_app() as test_app:
        yield test_app  # type: ignore[misc]


def mounted(**changes: Any) -> Settings:
    return Settings(demo_word_delay_s=0, wsgi_app=f"{LEGACY}:app").replace(**changes)


# Finding the app, as `flask --app` does ----------------------------------------------------------


def test_apps_are_found_as_flask_finds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_app(f"{LEGACY}:app") is legacy_apps.app
    assert load_app(f"{LEGACY}:raw_app") is legacy_apps.raw_app
    assert load_app(LEGACY) is legacy_apps.app  # `module` alone: its `app`
    assert load_app(f"{LEGACY}:create_app()").name == "factory"
    factory_app = load_app(f"{LEGACY}:create_app('bonjour')")
    assert factory_app.test_client().get("/greeting").text == "bonjour"
    # The working directory is on sys.path, as for `flask --app` (and a Procfile on Heroku).
    (tmp_path / "myshop.py").write_text("from flask import Flask\napp = Flask('shop')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_app("myshop:app").name == "shop"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("no_such_module_here:app", "no module 'no_such_module_here'"),
        (f"{LEGACY}:nothing", "has no 'nothing'"),
        (f"{LEGACY}:create_app(open('x'))", "literals"),
        (f"{LEGACY}:app.wsgi_app", "not a name"),
    ],
)
def test_a_wrong_app_fails_at_start_naming_the_variable(spec: str, problem: str) -> None:
    with pytest.raises(SettingsError, match="WSGI_APP") as caught:
        create_app(mounted(wsgi_app=spec))
    assert problem in str(caught.value)


def test_the_setting_refuses_what_is_not_an_app_spec() -> None:
    with pytest.raises(SettingsError, match="WSGI_APP"):
        Settings.from_env({"WSGI_APP": "legacy:app; rm -rf /"})
    assert Settings.from_env({"WSGI_APP": "legacy:create_app()"}).wsgi_app == "legacy:create_app()"


# Routing: chatbot's own routes first, everything else to the legacy app ------------------------


async def test_chatbot_routes_win_and_every_other_request_reaches_the_legacy_app() -> None:
    async with serving(mounted()) as app:
        client = app.test_client()
        page = await client.get("/")  # CHAT_PAGE_PATH=/ (default): the chat page wins
        assert page.status_code == 200 and "static/app.js" in (await page.get_data(as_text=True))
        assert (await client.get("/static/app.js")).status_code == 200
        assert await (await client.get("/healthz")).get_json() == {"status": "ok"}
        legacy = await client.get("/echo?a=1&a=2&b=%C3%A9", headers={"Cookie": "x=1; y=2"})
        body = await legacy.get_json()
        assert body["args"] == {"a": ["1", "2"], "b": ["é"]}
        assert body["cookies"] == {"x": "1", "y": "2"}
        assert body["thread"].startswith("wsgi-")  # a pool thread, not the event loop's
        # The legacy app's own 404 page, for a path nobody has; its static URL for a file the
        # chat page does not have.
        missing = await client.get("/static/logo.png")
        assert missing.status_code == 404
        assert await missing.get_data(as_text=True) == "legacy 404 page"
        # GET /chat is not chatbot's (it only takes POST): the legacy app answers.
        assert (await client.get("/chat")).status_code == 404
        posted = await client.post("/echo", form={"name": "Ada"})
        assert (await posted.get_json())["form"] == {"name": "Ada"}


async def test_the_chat_page_moves_and_gives_the_legacy_routes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="chatbot.mount"):
        async with serving(mounted()):
            pass
    assert "the legacy app's GET / is answered by chatbot" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chatbot.mount"):
        async with serving(mounted(chat_page_path="/assistant/")) as app:
            client = app.test_client()
            assert await (await client.get("/")).get_data(as_text=True) == "legacy home"
            page = await client.get("/assistant/")
            assert "static/app.js" in await page.get_data(as_text=True)
            assert (await client.get("/assistant/static/style.css")).status_code == 200
            assert (await client.get("/assistant")).status_code in (301, 308)
            chat = await client.post("/assistant/chat", json={"message": "hi"})
            assert chat.status_code == 200
    assert "answered by chatbot" not in caplog.text


async def test_a_streamed_legacy_response_and_a_failing_view() -> None:
    async with serving(mounted(wsgi_app=f"{LEGACY}:app")) as app:
        client = app.test_client()
        streamed = await client.get("/stream")
        assert await streamed.get_data(as_text=True) == "piece 0\npiece 1\npiece 2\n"
        failed = await client.get("/fail")  # Flask's own 500 page: its error handling is intact
        assert failed.status_code == 500
        assert "Internal Server Error" in await failed.get_data(as_text=True)
    async with serving(mounted(wsgi_app=f"{LEGACY}:raw_app")) as app:
        raw = await app.test_client().get("/any/path")
        assert await raw.get_data(as_text=True) == "raw /any/path"


async def test_the_legacy_session_cookie_is_its_own() -> None:
    async with serving(mounted()) as app:
        client = app.test_client()
        login = await client.post("/login", form={"user": "ada"})
        assert login.status_code == 200 and "session=" in login.headers["Set-Cookie"]
        assert await (await client.get("/whoami")).get_json() == {"user": "ada"}


async def test_bodies_over_the_limit_are_refused_before_taking_a_thread() -> None:
    async with serving(mounted(wsgi_max_body_bytes=1000)) as app:
        client = app.test_client()
        small = await client.post("/echo", data=b"x" * 1000)
        assert (await small.get_json())["body_bytes"] == 1000
        assert (await client.post("/echo", data=b"x" * 1001)).status_code == 413
        bridge = runtime_of(app.app).wsgi_bridge  # type: ignore[attr-defined]
        assert bridge is not None and bridge.threads.busy == 0


async def test_slow_views_wait_for_a_thread_and_a_flood_is_refused_with_503() -> None:
    threads = 2
    async with serving(mounted(wsgi_threads=threads)) as app:
        client = app.test_client()
        legacy_apps.running["most"] = 0
        flood = threads + threads * WAITING_PER_THREAD + 5
        replies = await asyncio.gather(*(client.get("/slow?s=0.3") for _ in range(flood)))
        codes = sorted(r.status_code for r in replies)
    assert codes.count(503) == 5, codes
    assert codes.count(200) == threads + threads * WAITING_PER_THREAD
    assert legacy_apps.running["most"] == threads  # never more views at once than threads


# Your own Quart app built on create_app() ------------------------------------------------------


async def test_protected_applies_the_access_token_and_the_address_limit() -> None:
    token = "a-long-enough-access-token"
    # Per hour: a per-minute sliding window lets a 3rd hit through when a loaded run straddles
    # the minute (the previous minute's 2 hits, weighted 0.99, count 1.98).
    settings = Settings(access_token=token, rate_limit_ip="2/hour", demo_word_delay_s=0)
    app = create_app(settings)
    mine = Blueprint("mine", __name__)

    @mine.get("/api/report")
    @protected
    async def report() -> dict[str, str]:
        return {"report": "ok"}

    @mine.get("/plain")
    @protected
    def plain() -> dict[str, str]:  # a sync view works too
        return {"plain": "ok"}

    app.register_blueprint(mine)
    async with serving(settings, app) as running:
        client = running.test_client()
        refused = await client.get("/api/report")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        bearer = {"Authorization": f"Bearer {token}"}
        assert (await client.get("/api/report", headers=bearer)).status_code == 200
        assert (await client.get("/plain", query_string={"token": token})).status_code == 200
        limited = await client.get("/api/report", headers=bearer)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert "error" in await limited.get_json()


async def test_sessions_need_secret_key_and_templates_come_from_templates_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "hello.html").write_text("Hello {{ name }}, visit {{ session.get('visits') }}")

    def build(secret: str | None) -> Quart:
        app = create_app(Settings(secret_key=secret, templates_dir=str(tmp_path)))

        @app.get("/visit")
        async def visit() -> str:
            session["visits"] = session.get("visits", 0) + 1
            return await render_template("hello.html", name="Ada")

        return app

    async with serving(Settings(), build(None)) as app:
        failed = await app.test_client().get("/visit")
    assert failed.status_code == 500
    assert "set SECRET_KEY" in caplog.text
    async with serving(Settings(), build("a-secret-key-of-some-length")) as app:
        client = app.test_client()
        await client.get("/visit")
        second = await client.get("/visit")
        assert await second.get_data(as_text=True) == "Hello Ada, visit 2"


def test_secret_key_is_never_echoed_and_static_dir_needs_the_page_moved(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"SECRET_KEY": "short-secret"})
    assert "short-secret" not in str(caught.value)
    assert "short-secret" not in repr(Settings(secret_key="short-secret"))
    with pytest.raises(SettingsError, match="STATIC_DIR"):
        Settings.from_env({"STATIC_DIR": str(tmp_path)})
    moved = Settings.from_env({"STATIC_DIR": str(tmp_path), "CHAT_PAGE_PATH": "/assistant"})
    assert moved.chat_page_path == "/assistant/"


async def test_static_dir_is_served_beside_the_moved_chat_page(tmp_path: Path) -> None:
    (tmp_path / "logo.txt").write_text("our logo")
    settings = Settings(static_dir=str(tmp_path), chat_page_path="/assistant/")
    async with serving(settings) as app:
        client = app.test_client()
        assert await (await client.get("/static/logo.txt")).get_data(as_text=True) == "our logo"
        assert (await client.get("/assistant/static/app.js")).status_code == 200


# A real server: blocking legacy views cost threads, not the event loop ------------------------


@pytest.fixture
def slow_legacy_server() -> Any:
    server = ChatbotProcess(
        {
            "WSGI_APP": f"{LEGACY}:app",
            "WSGI_THREADS": "8",
            "DEMO_WORD_DELAY_S": "0.02",
            "MAX_SOCKETS_PER_IP": "1000",
            "RATE_LIMIT_IP": "100000/minute",
            "LOG_FORMAT": "text",
        },
        name="slow-legacy",
    ).start()
    yield server
    server.stop()


async def test_slow_legacy_views_do_not_hold_up_streaming_sockets(slow_legacy_server: Any) -> None:
    """16 views blocking 5 s each (two rounds of 8 threads) run while 20 sockets stream whole
    replies: every reply is done before the first view has returned."""
    server = slow_legacy_server
    view_s = 5.0
    done_at: list[float] = []
    views_back_at: list[float] = []

    async def slow_view(client: httpx.AsyncClient) -> None:
        reply = await client.get("/slow", params={"s": view_s}, timeout=60)
        assert reply.status_code == 200
        views_back_at.append(time.monotonic())

    async def chat(n: int) -> None:
        reply, _ = await reply_over(server.ws_url, f"tell me {n}")
        assert reply
        done_at.append(time.monotonic())

    async with httpx.AsyncClient(base_url=server.url) as client, asyncio.timeout(60):
        views = [asyncio.create_task(slow_view(client)) for _ in range(16)]
        await asyncio.sleep(0.2)  # the views have started blocking their threads
        started = time.monotonic()
        await asyncio.gather(*(chat(n) for n in range(20)))
        await asyncio.gather(*views)
    assert len(done_at) == 20
    # Each demo reply streams in about a second; none waited for a blocking view.
    assert max(done_at) < min(views_back_at), (max(done_at) - started, min(views_back_at) - started)


def test_sigterm_lets_a_running_legacy_view_finish_before_the_process_stops(
    slow_legacy_server: Any,
) -> None:
    """Like gunicorn's graceful timeout: a view still running at SIGTERM answers (within
    SHUTDOWN_GRACE_S), and the process exits once it has."""
    import threading
    import urllib.request

    server = slow_legacy_server
    answers: list[int] = []

    def slow_request() -> None:
        with urllib.request.urlopen(server.url + "/slow?s=3", timeout=30) as reply:
            answers.append(reply.status)

    caller = threading.Thread(target=slow_request)
    caller.start()
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while legacy_apps.STARTED not in server.output():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)  # polling the log with a deadline: the line is the only signal
    assert server.terminate(timeout_s=30) == 0, server.output()
    caller.join(timeout=30)
    assert answers == [200], server.output()


async def test_a_streamed_legacy_response_streams(slow_legacy_server: Any) -> None:
    """A response without a length is sent piece by piece as the view yields it (one with a
    length comes back whole): the first piece arrives while the view still holds the rest."""
    server = slow_legacy_server
    async with httpx.AsyncClient(base_url=server.url, timeout=CALL_TIMEOUT_S) as client:
        async with client.stream("GET", "/held-stream") as streamed:
            pieces = streamed.aiter_text()
            assert await anext(pieces) == "first piece\n"
            assert (await client.get("/release")).text == "released"
            assert "".join([piece async for piece in pieces]) == "the rest\n"


async def test_a_request_whose_client_leaves_mid_body_never_reaches_the_legacy_app(
    slow_legacy_server: Any,
) -> None:
    """A POST cut off halfway (the client gone) is not handed to the view as if whole."""
    server = slow_legacy_server
    async with httpx.AsyncClient(base_url=server.url, timeout=CALL_TIMEOUT_S) as client:
        before = (await client.get("/counts")).json()["echoed"]
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        writer.write(head + b"a=" + b"x" * 1000)
        await writer.drain()
        writer.close()  # gone, 1 KB of 100 KB sent
        await writer.wait_closed()
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while "client left before its body arrived" not in server.output():
            assert time.monotonic() < deadline, server.output()[-2000:]
            await asyncio.sleep(0.05)  # polling the log with a deadline: the line is the signal
        whole = await client.post("/echo", content=b"y" * 100)
        assert whole.json()["body_bytes"] == 100
        after = (await client.get("/counts")).json()["echoed"]
    assert after == before + 1, (before, after)
