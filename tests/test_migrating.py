"""docs/migrating.md stays true: each stage's Procfile (examples/flask_app/) run by honcho serves
the Flask routes and the chat together and drains sockets with 1012 on SIGTERM; the Python `/ws`
client snippet (examples/clients/chat_client.py) chats and resumes through a dropped connection.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.browser.tcp_proxy import TcpProxy
from tests.support.frames import reply_over
from tests.support.procs import ROOT, ChatbotProcess, FakeOpenAIProcess, free_port
from tests.test_procfile import CALL_TIMEOUT_S, Honcho, linux_only

EXAMPLE = ROOT / "examples" / "flask_app"
SECRET_KEY = "migrating-secret-key-0123456789"


def load_snippet(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def stage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Honcho]:
    env_file = tmp_path / "stage.env"  # what `heroku config:set` would hold
    env_file.write_text(f"SECRET_KEY={SECRET_KEY}\nDEMO_WORD_DELAY_S=0.01\nLOG_FORMAT=text\n")
    runner = Honcho(tmp_path / "honcho.log", free_port(), f"Procfile.{request.param}", EXAMPLE)
    await runner.start(env_file)
    try:
        yield runner
    finally:
        await runner.kill()


@linux_only
@pytest.mark.parametrize("stage", ["mount", "port", "ported"], indirect=True)
async def test_each_stage_serves_the_app_and_the_chat_and_drains_with_1012(stage: Honcho) -> None:
    base = f"http://127.0.0.1:{stage.port}"
    async with httpx.AsyncClient(base_url=base, timeout=CALL_TIMEOUT_S) as client:
        await stage.wait_healthy(client)
        login = await client.post("/login", data={"name": "ada", "password": "lovelace"})
        assert login.status_code == 302 and login.headers["location"] == "/", login.text
        home = await client.get("/")
        assert home.status_code == 200 and "Hello, ada" in home.text
        notes = await client.get("/api/notes", params={"q": "mount"})
        assert notes.json()["notes"] == ["Mount the Flask app"]
        page = await client.get("/assistant/")
        assert page.status_code == 200 and "static/app.js" in page.text
        chat = await client.post("/assistant/chat", json={"message": "ping"})
        assert chat.status_code == 200 and "ping" in chat.json()["response"]
    ws_url = f"ws://127.0.0.1:{stage.port}/ws"
    async with asyncio.timeout(CALL_TIMEOUT_S), connect(ws_url) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        code = await stage.terminate()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012, stage.output()
    assert code == 143, stage.output()
    assert "SIGKILL" not in stage.output()
    assert "Traceback" not in stage.output()


# The Python client snippet -----------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_server() -> Any:
    fake = FakeOpenAIProcess("--ttft-ms", "20", "--chunks", "8", "--interval-ms", "20").start()
    server = ChatbotProcess(
        {
            "OPENAI_BASE_URL": fake.base_url,
            "OPENAI_API_KEY": "",
            "REDIS_URL": "",
            "LOG_FORMAT": "text",
        },
        name="snippet-server",
    ).start()
    yield server
    server.kill()
    fake.stop()


async def logged_reply(server: Any, session: str) -> str:
    """The session's reply as its log has it, read by a fresh socket from the start."""
    reply, same = await reply_over(server.ws_url, session=session, after=0)
    assert same == session
    return reply


async def test_the_python_snippet_chats_and_continues_the_conversation(chat_server: Any) -> None:
    client = load_snippet(ROOT / "examples" / "clients" / "chat_client.py")
    streamed: list[str] = []
    async with asyncio.timeout(CALL_TIMEOUT_S):
        reply, session = await client.ask(
            chat_server.ws_url, "hello there", on_delta=streamed.append
        )
        assert reply and "".join(streamed) == reply
        assert reply == await logged_reply(chat_server, session)
        second, same = await client.ask(chat_server.ws_url, "and again", session=session)
    assert same == session and second


async def test_the_python_snippet_resumes_through_dropped_connections(chat_server: Any) -> None:
    client = load_snippet(ROOT / "examples" / "clients" / "chat_client.py")
    prompt = "[[fake:chunks=60]] [[fake:interval_ms=40]] a long answer, please"
    async with TcpProxy(chat_server.port) as proxy:
        url = proxy.url.replace("http", "ws") + "/ws"
        pieces: list[str] = []
        cuts = 0

        def on_delta(piece: str) -> None:
            nonlocal cuts
            pieces.append(piece)
            if len(pieces) in (3, 20):  # mid-reply, twice
                cuts += proxy.sever()

        async with asyncio.timeout(30):
            reply, session = await client.ask(url, prompt, on_delta=on_delta)
    assert cuts >= 2
    assert reply == "".join(pieces) == await logged_reply(chat_server, session)


def test_the_guide_shows_the_tested_snippets() -> None:
    """docs/migrating.md pastes the client files verbatim: what users copy is what runs here."""
    guide = (ROOT / "docs" / "migrating.md").read_text()
    blocks = re.findall(r"```(python|js)\n(.*?)```", guide, flags=re.DOTALL)
    shown = {lang: code for lang, code in blocks if len(code.splitlines()) > 20}
    clients = ROOT / "examples" / "clients"
    assert shown["python"] == (clients / "chat_client.py").read_text()
    assert shown["js"] == (clients / "chat_client.js").read_text()


async def test_stage_two_runs_with_workers(redis_server: Any) -> None:
    """`chatbot serve ported:app --workers 2` with WSGI_APP: each worker process loads both
    apps from the working directory, and every request, whichever worker takes it, is served."""
    server = ChatbotProcess(
        {
            "WSGI_APP": "legacy:app",
            "CHAT_PAGE_PATH": "/assistant/",
            "SECRET_KEY": SECRET_KEY,
            "REDIS_URL": redis_server.url,
            "DEMO_WORD_DELAY_S": "0",
        },
        name="workers",
        args=("ported:app", "--workers", "2"),
        cwd=EXAMPLE,
    ).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=CALL_TIMEOUT_S) as client:
            for _ in range(6):  # new connections: the kernel spreads them over the workers
                login = await client.post("/login", data={"name": "ada", "password": "lovelace"})
                assert login.status_code == 302, login.text
                page = await client.get("/assistant/", headers={"Connection": "close"})
                assert page.status_code == 200
        reply, _ = await reply_over(server.ws_url, "hello workers")
        assert "hello workers" in reply
        assert server.output().count("serving legacy:app") == 2, server.output()
    finally:
        server.stop()
