"""A faulty model service: timeouts, retries before the first token only, the circuit breaker.

The real app in-process, the real `openai` client, and the fake OpenAI server injecting faults
with `[[fake:...]]` directives. Every fault must end the reply with a readable `error` event and
`done reason=error`, close the upstream request, and leave the socket usable.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager, suppress
from typing import Any

import pytest
from quart import Quart

from chatbot.fake_openai import FakeOpenAI, reply_chunks, reply_text
from chatbot.llm import open_model
from chatbot.settings import Settings

from .conftest import API_KEY, Socket, text_of

FAILED_FAST_S = 1.0  # a breaker-refused reply, or a 429 too long to wait for, answers at once


@asynccontextmanager
async def chat(
    app_with: Callable[..., Any], settings: Settings, **changes: Any
) -> AsyncIterator[tuple[Quart, Socket]]:
    """The app with `changes` to its settings, and one socket on it that got `ready`."""
    async with app_with(settings.replace(**changes)) as app:
        async with app.test_client().websocket("/ws") as raw:
            ws = Socket(raw)
            assert (await ws.recv())["type"] == "ready"
            yield app, ws


async def send(ws: Socket, text: str, msg_id: str = "m", timeout_s: float = 10) -> list[dict]:
    """Send a message; its frames up to its `done`."""
    await ws.send({"type": "message", "id": msg_id, "text": text})
    return await ws.until_done(timeout_s)


def failed_with(frames: list[dict], code: str, msg_id: str = "m") -> dict[str, Any]:
    """Check that the reply failed with one readable `error` event, then `done reason=error`."""
    assert frames[0]["type"] == "user"
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1, frames
    error = errors[0]
    assert (error["code"], error["reply_to"]) == (code, msg_id)
    assert "seq" in error  # logged: every socket and every replay sees it
    assert error["message"].endswith(".") and "Traceback" not in error["message"]
    assert API_KEY not in json.dumps(frames)
    assert frames[-1] == {"type": "done", "seq": frames[-1]["seq"], "reply_to": msg_id,
                          "reason": "error"}  # fmt: skip
    return error


async def still_usable(ws: Socket) -> None:
    frames = await send(ws, "are you back?", msg_id="next")
    assert frames[-1]["reason"] == "stop"
    assert text_of(frames) == reply_text("are you back?", 5)


async def readyz(app: Quart) -> tuple[int, dict[str, Any]]:
    response = await app.test_client().get("/readyz")
    return response.status_code, await response.get_json()


def closed_port() -> int:
    """A port nothing listens on: bound for a moment to get a free one, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Timeouts.


async def test_connection_refused_is_retried_then_unreachable(app_with, settings) -> None:
    nowhere = f"http://127.0.0.1:{closed_port()}/v1"
    async with chat(app_with, settings, openai_base_url=nowhere, upstream_max_retries=1) as (
        app,
        ws,
    ):
        error = failed_with(await send(ws, "hello?"), "upstream_unreachable")
        assert "cannot be reached" in error["message"]
        # The socket and the session stay usable: the next message is accepted (and fails too).
        again = await send(ws, "anyone?", msg_id="again")
        failed_with(again, "upstream_unreachable", msg_id="again")
        status, body = await readyz(app)
    assert status == 200
    assert body["upstream"] == {"breaker": "closed", "consecutive_failures": 2}


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A port where connecting hangs: a listener whose accept queue is full and never drained,
    so the kernel drops further SYNs instead of refusing them."""
    with socket.socket() as listener, ExitStack() as fillers:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(4):
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            with suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port


async def test_connect_timeout(app_with, settings) -> None:
    with unanswered_port() as port:
        changes = {
            "openai_base_url": f"http://127.0.0.1:{port}/v1",
            "upstream_connect_timeout_s": 0.3,
            "upstream_max_retries": 0,
        }
        async with chat(app_with, settings, **changes) as (_, ws):
            started = asyncio.get_running_loop().time()
            error = failed_with(await send(ws, "knock knock"), "upstream_timeout")
            elapsed = asyncio.get_running_loop().time() - started
    assert "too long" in error["message"]
    assert 0.3 <= elapsed < 2  # the connect timeout, not the 30 s first-token one


@pytest.mark.parametrize("fault", ["[[fake:ttft_ms=5000]]", "[[fake:hang]]"])
async def test_first_token_timeout(app_with, settings, fake: FakeOpenAI, fault: str) -> None:
    # ttft: headers arrive, the first words do not; hang: not even the response headers.
    async with chat(app_with, settings, upstream_first_token_timeout_s=0.5) as (_, ws):
        started = asyncio.get_running_loop().time()
        frames = await send(ws, f"{fault} slow")
        elapsed = asyncio.get_running_loop().time() - started
        error = failed_with(frames, "upstream_timeout")
        assert "did not start answering within 0.5 s" in error["message"]
        assert 0.5 <= elapsed < 3
        record = await fake.wait_request(1, ended=True)
        assert record["status"] == "aborted"  # we hung up: it generates nothing for nobody
        assert len(fake.requests) == 1  # the deadline is spent: no retry
        await still_usable(ws)


async def test_idle_timeout_between_tokens(app_with, settings, fake: FakeOpenAI) -> None:
    async with chat(app_with, settings, upstream_idle_timeout_s=0.3) as (_, ws):
        frames = await send(ws, "[[fake:hang_after=2]] stall")
        error = failed_with(frames, "upstream_timeout")
        assert "stopped answering for 0.3 s mid-reply" in error["message"]
        assert text_of(frames) == "".join(reply_chunks("stall", 5)[:2])  # sent before the stall
        record = await fake.wait_request(1, ended=True)
        assert record["status"] == "aborted"
        assert len(fake.requests) == 1  # never retried after the first token
        await still_usable(ws)


async def test_idle_deadline_counts_only_the_wait_for_the_service(
    settings, fake: FakeOpenAI
) -> None:
    """A consumer slower than the idle deadline (a broker riding out an outage) is not the
    service stalling: the reply goes on, whole."""
    model = open_model(settings.replace(upstream_idle_timeout_s=0.2))
    try:
        pieces = []
        async with asyncio.timeout(10), model.stream([{"role": "user", "content": "slow"}]) as r:
            async for piece in r:
                pieces.append(piece)
                await asyncio.sleep(0.35)
        assert "".join(pieces) == reply_text("slow", 5)
        assert r.finish_reason == "stop"
    finally:
        await model.close()


# Retries: before the first token only.


async def test_429_is_retried_then_says_when_to_try_again(
    app_with, settings, fake: FakeOpenAI
) -> None:
    async with chat(app_with, settings, upstream_max_retries=2) as (_, ws):
        frames = await send(ws, "[[fake:status=429]] [[fake:retry_after=0]] busy?")
        error = failed_with(frames, "upstream_rate_limited")
        assert "Try again in 1 s" in error["message"]
        assert len(fake.requests) == 3  # the first try and two retries
        assert all(r["status"] == "error_response" for r in fake.requests)
        await still_usable(ws)


async def test_a_retry_after_beyond_the_first_token_timeout_is_not_waited_for(
    app_with, settings, fake: FakeOpenAI
) -> None:
    async with chat(app_with, settings, upstream_first_token_timeout_s=5) as (_, ws):
        started = asyncio.get_running_loop().time()
        frames = await send(ws, "[[fake:status=429]] [[fake:retry_after=20]] busy?")
        assert asyncio.get_running_loop().time() - started < FAILED_FAST_S
        error = failed_with(frames, "upstream_rate_limited")
        assert "Try again in 20 s" in error["message"]
        assert len(fake.requests) == 1
        await still_usable(ws)


async def test_5xx_is_retried_then_fails(app_with, settings, fake: FakeOpenAI) -> None:
    async with chat(app_with, settings, upstream_max_retries=2) as (_, ws):
        frames = await send(ws, "[[fake:status=503]] [[fake:retry_after=0]] down?")
        error = failed_with(frames, "upstream_unavailable")
        assert "HTTP 503" in error["message"]
        assert len(fake.requests) == 3
        await still_usable(ws)


@pytest.mark.parametrize(("status", "code"), [(400, "upstream_rejected"), (401, "upstream_auth")])
async def test_a_refusal_is_not_retried(
    app_with, settings, fake: FakeOpenAI, status: int, code: str
) -> None:
    async with chat(app_with, settings, upstream_max_retries=2) as (_, ws):
        failed_with(await send(ws, f"[[fake:status={status}]] no"), code)
        assert len(fake.requests) == 1
        await still_usable(ws)


@pytest.mark.parametrize(
    ("fault", "code", "record_status"),
    [
        ("[[fake:cut=3]]", "upstream_unreachable", {"failed"}),
        # The fake may finish its last chunks before it notices that we hung up.
        ("[[fake:malformed=2]]", "upstream_malformed", {"aborted", "completed"}),
    ],
)
async def test_a_stream_that_breaks_after_the_first_token_is_not_retried(
    app_with, settings, fake: FakeOpenAI, fault: str, code: str, record_status: set[str]
) -> None:
    async with chat(app_with, settings, upstream_max_retries=2) as (_, ws):
        frames = await send(ws, f"{fault} break")
        failed_with(frames, code)
        assert text_of(frames)  # the user saw words: a retry would repeat or contradict them
        record = await fake.wait_request(1, ended=True)
        assert record["status"] in record_status
        assert len(fake.requests) == 1
        await still_usable(ws)


# The circuit breaker.


async def test_the_breaker_opens_fails_fast_and_closes_after_a_trial(
    app_with, settings, fake: FakeOpenAI
) -> None:
    changes = {"upstream_max_retries": 0, "upstream_breaker_cooldown_s": 0.3}
    async with chat(app_with, settings, **changes) as (app, ws):
        for n in range(5):
            failed_with(await send(ws, f"[[fake:status=500]] {n}", msg_id=f"f{n}"),
                        "upstream_unavailable", msg_id=f"f{n}")  # fmt: skip
        status, body = await readyz(app)
        assert status == 200  # the upstream is shared: failing readiness would fail every instance
        assert body["status"] == "ready"
        assert body["upstream"] == {"breaker": "open", "consecutive_failures": 5}

        started = asyncio.get_running_loop().time()
        error = failed_with(await send(ws, "hello"), "upstream_unavailable")
        assert asyncio.get_running_loop().time() - started < FAILED_FAST_S
        assert "is down" in error["message"] and "Try again in 1 s" in error["message"]
        assert len(fake.requests) == 5  # no call upstream
        response = await app.test_client().post("/chat", json={"message": "hello"})
        assert response.status_code == 503
        assert set(await response.get_json()) == {"error"}
        assert response.headers["Retry-After"] == "1"
        assert len(fake.requests) == 5

        await asyncio.sleep(0.35)  # the cooldown passing is the behaviour under test
        assert (await readyz(app))[1]["upstream"]["breaker"] == "half_open"
        await still_usable(ws)  # the trial goes through and succeeds
        assert len(fake.requests) == 6
        assert (await readyz(app))[1]["upstream"] == {
            "breaker": "closed",
            "consecutive_failures": 0,
        }


async def test_a_failed_trial_opens_the_breaker_again(app_with, settings, fake: FakeOpenAI) -> None:
    changes = {
        "upstream_max_retries": 0,
        "upstream_breaker_failures": 2,
        "upstream_breaker_cooldown_s": 0.3,
    }
    async with chat(app_with, settings, **changes) as (app, ws):
        for n in range(2):
            await send(ws, f"[[fake:status=502]] {n}", msg_id=f"f{n}")
        await asyncio.sleep(0.35)  # the cooldown passing is the behaviour under test
        failed_with(await send(ws, "[[fake:status=502]] trial"), "upstream_unavailable")
        assert len(fake.requests) == 3  # the trial went through
        assert (await readyz(app))[1]["upstream"]["breaker"] == "open"
        error = failed_with(await send(ws, "again", msg_id="again"), "upstream_unavailable",
                            msg_id="again")  # fmt: skip
        assert "is down" in error["message"]
        assert len(fake.requests) == 3


async def test_timeouts_open_the_breaker_but_refusals_do_not_count(
    app_with, settings, fake: FakeOpenAI
) -> None:
    changes = {"upstream_max_retries": 0, "upstream_breaker_failures": 2}
    async with chat(app_with, settings, upstream_first_token_timeout_s=0.2, **changes) as (
        app,
        ws,
    ):
        for n in range(3):
            await send(ws, f"[[fake:status=400]] {n}", msg_id=f"r{n}")
        assert (await readyz(app))[1]["upstream"] == {
            "breaker": "closed",
            "consecutive_failures": 0,
        }
        for n in range(2):
            await send(ws, f"[[fake:ttft_ms=2000]] {n}", msg_id=f"t{n}")
        assert (await readyz(app))[1]["upstream"]["breaker"] == "open"


async def test_the_demo_model_reports_a_closed_breaker(app_with) -> None:
    async with app_with(Settings(demo_word_delay_s=0)) as app:
        status, body = await readyz(app)
    assert status == 200
    assert body["upstream"] == {"breaker": "closed", "consecutive_failures": 0}


# The HTTP client itself.


async def test_requests_go_through_the_proxy_the_environment_names(
    settings, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY (or HTTPS_PROXY) as the SDK honours it: the model's host, which does not
    resolve, is reached through the proxy (the fake serves the absolute-form request itself)."""
    monkeypatch.setenv("HTTP_PROXY", fake.base_url.removesuffix("/v1"))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    model = open_model(settings.replace(openai_base_url="http://model.invalid/v1"))
    try:
        async with asyncio.timeout(10), model.stream([{"role": "user", "content": "hi"}]) as r:
            assert "".join([piece async for piece in r]) == reply_text("hi", 5)
        assert len(fake.requests) == 1
    finally:
        await model.close()


async def test_pieces_that_arrive_together_are_one(settings) -> None:
    """Chunks read in one go (a loaded process reads less often) are yielded as one piece: one
    delta frame, one broker write. Nothing is waited for to make that happen."""
    events = [{"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
              for w in ("One", " two", " three")]  # fmt: skip
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events) + b"data: [DONE]\n\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the body follows; it is not needed here
        writer.write(head % len(body) + body)  # the whole reply in one write
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    model = open_model(settings.replace(openai_base_url=f"http://127.0.0.1:{port}/v1"))
    try:
        async with asyncio.timeout(10), model.stream([{"role": "user", "content": "hi"}]) as r:
            assert [piece async for piece in r] == ["One two three"]
        assert r.finish_reason == "stop"
    finally:
        await model.close()
        server.close()
