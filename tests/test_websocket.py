"""The /ws protocol end to end: the real app in-process, the real openai client, the fake server."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest
from quart.testing.connections import WebsocketDisconnectError, WebsocketResponseError

from chatbot.chat.feed import Feed
from chatbot.fake_openai import FakeOpenAI, reply_chunks, reply_text
from chatbot.runtime import runtime_of
from chatbot.settings import DEFAULT_SYSTEM_PROMPT, Settings

from .conftest import Socket, seqs, text_of
from .support.waiting import wait_until


async def test_ready_then_streamed_reply(connect, fake: FakeOpenAI) -> None:
    # Chunks far enough apart that none arrive together (those would be one delta).
    fake.configure(interval_ms=30)
    async with connect() as (ws, ready):
        assert ready == {
            "type": "ready",
            "session": ready["session"],
            "seq": 0,
            "epoch": ready["epoch"],
            "model": "test-model",
            "demo": False,
        }
        assert len(ready["session"]) >= 22  # >= 128 random bits, URL-safe base64
        await ws.send({"type": "message", "id": "m1", "text": "hello"})
        frames = await ws.until_done()
    assert frames[0] == {"type": "user", "seq": 1, "id": "m1", "text": "hello"}
    deltas = [f for f in frames if f["type"] == "delta"]
    assert [d["text"] for d in deltas] == reply_chunks("hello", 5)
    assert all(d["reply_to"] == "m1" for d in deltas)
    assert frames[-1] == {"type": "done", "seq": 7, "reply_to": "m1", "reason": "stop"}
    assert seqs(frames) == list(range(1, 8))


async def test_server_makes_message_ids_when_the_client_sends_none(connect) -> None:
    async with connect() as (ws, _):
        await ws.send({"type": "message", "text": "hi"})
        frames = await ws.until_done()
    msg_id = frames[0]["id"]
    assert len(msg_id) >= 22
    assert {f["reply_to"] for f in frames[1:]} == {msg_id}


async def test_multi_turn_context_is_system_prompt_plus_history(connect, fake: FakeOpenAI) -> None:
    async with connect() as (ws, _):
        await ws.send({"type": "message", "text": "first"})
        await ws.until_done()
        await ws.send({"type": "message", "text": "second"})
        await ws.until_done()
    assert fake.requests[1]["messages"] == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": reply_text("first", 5)},
        {"role": "user", "content": "second"},
    ]


async def test_history_is_capped_to_the_last_turns(app_with, settings, fake: FakeOpenAI) -> None:
    async with app_with(settings.replace(history_turns=1)) as app:
        async with app.test_client().websocket("/ws") as raw:
            ws = Socket(raw)
            await ws.recv()
            for text in ("one", "two", "three"):
                await ws.send({"type": "message", "text": text})
                await ws.until_done()
    assert [m["content"] for m in fake.requests[2]["messages"][1:]] == [
        reply_text("two", 5),
        "three",
    ]


async def test_two_sockets_of_one_session_see_the_same_events(connect) -> None:
    async with connect() as (a, ready), connect(session=ready["session"]) as (b, ready_b):
        assert ready_b["session"] == ready["session"]
        await a.send({"type": "message", "text": "to both"})
        seen_a = await a.until_done()
        seen_b = await b.until_done()
    assert seen_a == seen_b
    assert seen_a[0]["text"] == "to both"


async def test_unknown_session_gets_a_new_one(connect) -> None:
    async with connect(session="not-a-real-session", after=5) as (_, ready):
        assert ready["session"] != "not-a-real-session"
        assert ready["seq"] == 0


async def test_resume_after_replays_then_goes_live_without_gap_or_duplicate(
    connect, fake: FakeOpenAI
) -> None:
    fake.configure(chunks=30, interval_ms=20)
    async with connect() as (ws, ready):
        await ws.send({"type": "message", "id": "long", "text": "stream"})
        early = await ws.until(lambda f: f.get("seq") == 4)
    # The first socket is gone; the reply goes on. Resume from the last seq seen, mid-reply.
    async with connect(session=ready["session"], after=4) as (ws, again):
        assert again["seq"] >= 4
        rest = await ws.until_done()
    frames = early + rest
    assert seqs(frames) == list(range(1, len(seqs(frames)) + 1))  # none lost, none twice
    assert text_of(frames) == reply_text("stream", 30)


async def test_after_zero_replays_the_whole_conversation(connect) -> None:
    async with connect() as (ws, ready):
        await ws.send({"type": "message", "text": "remember me"})
        live = await ws.until_done()
    async with connect(session=ready["session"], after=0) as (ws, again):
        assert again["seq"] == live[-1]["seq"]
        replayed = [await ws.recv() for _ in live]
    assert replayed == live


async def test_reply_completes_when_every_socket_has_gone(connect, fake: FakeOpenAI) -> None:
    fake.configure(chunks=10, interval_ms=20)
    async with connect() as (ws, ready):
        await ws.send({"type": "message", "text": "keep going"})
        await ws.until(lambda f: f["type"] == "delta")
    record = await fake.wait_request(1, ended=True)
    assert record["status"] == "completed"
    async with connect(session=ready["session"], after=0) as (ws, _):
        frames = await ws.until_done()
    assert frames[-1]["reason"] == "stop"
    assert text_of(frames) == reply_text("keep going", 10)


async def test_stop_closes_the_upstream_stream_at_once(connect, fake: FakeOpenAI) -> None:
    fake.configure(chunks=200, interval_ms=50)
    async with connect() as (ws, _):
        await ws.send({"type": "message", "id": "m", "text": "talk a lot"})
        frames = await ws.until(lambda f: f["type"] == "delta")
        await ws.send({"type": "stop"})
        frames += await ws.until_done()
        assert frames[-1]["reason"] == "cancelled"
        record = await fake.wait_request(1, ended=True, timeout_s=2)
        assert record["status"] == "aborted"
        assert record["chunks_sent"] < 200
        # The session is free again, and the partial reply is in the context.
        fake.configure(chunks=2, interval_ms=0)
        await ws.send({"type": "message", "text": "next"})
        await ws.until_done()
    context = fake.requests[1]["messages"]
    assert context[2]["role"] == "assistant"
    assert context[2]["content"] == text_of(frames)


async def test_stop_without_a_reply_is_harmless(connect) -> None:
    async with connect() as (ws, _):
        await ws.send({"type": "stop"})
        await ws.send({"type": "message", "text": "still fine"})
        frames = await ws.until_done()
    assert frames[0]["type"] == "user"


async def test_busy_while_a_reply_streams(connect, fake: FakeOpenAI) -> None:
    fake.configure(chunks=20, interval_ms=20)
    async with connect() as (ws, ready), connect(session=ready["session"]) as (other, _):
        await ws.send({"type": "message", "id": "first", "text": "one"})
        await ws.until(lambda f: f["type"] == "user")
        await other.send({"type": "message", "id": "second", "text": "two"})
        busy = await other.until(lambda f: f["type"] == "error")
        assert busy[-1]["code"] == "busy"
        assert busy[-1]["id"] == "second"
        assert "seq" not in busy[-1]
        frames = await ws.until_done()
    assert all(f.get("id") != "second" and f.get("reply_to") != "second" for f in frames)


async def test_next_message_right_after_done_is_accepted(connect) -> None:
    async with connect() as (ws, _):
        for n in range(3):
            await ws.send({"type": "message", "text": f"quick {n}"})
            frames = await ws.until_done()
            assert frames[0]["type"] == "user", frames


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        ('{"text": "no type"}', "unknown_type"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "message"}', "invalid_frame"),
        ('{"type": "message", "text": 5}', "invalid_frame"),
        ('{"type": "message", "text": "   "}', "empty"),
        ('{"type": "message", "text": "x", "extra": 1}', "invalid_frame"),
        ('{"type": "message", "text": "x", "id": 7}', "invalid_frame"),
        (json.dumps({"type": "message", "text": "x", "id": "i" * 65}), "invalid_frame"),
        (json.dumps({"type": "message", "text": "x" * 4001}), "too_long"),
        (b"\x00\x01binary", "unsupported_binary"),
    ],
)
async def test_bad_frames_get_an_error_and_the_socket_stays_usable(
    connect, frame: str | bytes, code: str
) -> None:
    async with connect() as (ws, _):
        await ws.send(frame)
        error = await ws.recv()
        assert error["type"] == "error"
        assert error["code"] == code
        assert error["message"]
        assert "seq" not in error
        await ws.send({"type": "message", "text": "after the bad one"})
        frames = await ws.until_done()
    assert frames[0]["seq"] == 1  # nothing of the bad frame was stored


async def test_too_long_names_the_limit(connect) -> None:
    async with connect() as (ws, _):
        await ws.send({"type": "message", "id": "big", "text": "x" * 5000})
        error = await ws.recv()
    assert error["id"] == "big"
    assert "5000" in error["message"] and "4000" in error["message"]


@pytest.mark.parametrize(
    ("directive", "code"),
    [
        ("[[fake:status=401]]", "upstream_auth"),
        ("[[fake:status=429]] [[fake:retry_after=0]]", "upstream_rate_limited"),
        ("[[fake:status=500]]", "upstream_unavailable"),
        ("[[fake:status=400]]", "upstream_rejected"),
        ("[[fake:cut=2]]", "upstream_unreachable"),
        ("[[fake:malformed=2]]", "upstream_malformed"),
    ],
)
async def test_upstream_faults_end_the_reply_with_a_readable_error(
    connect, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture, directive: str, code: str
) -> None:
    async with connect() as (ws, _):
        await ws.send({"type": "message", "id": "m", "text": f"fail {directive}"})
        frames = await ws.until_done(timeout_s=10)
        error = next(f for f in frames if f["type"] == "error")
        assert error["code"] == code
        assert error["reply_to"] == "m"
        assert "seq" in error  # logged: every socket and every resume sees it
        assert frames[-1]["reason"] == "error"
        # The socket and the session stay usable.
        await ws.send({"type": "message", "text": "recovered"})
        again = await ws.until_done()
        assert again[-1]["reason"] == "stop"
    everything = json.dumps(frames) + caplog.text
    assert "sk-test" not in everything


async def test_upstream_timeout(app_with, settings, fake: FakeOpenAI) -> None:
    async with app_with(settings.replace(upstream_idle_timeout_s=0.3)) as app:
        async with app.test_client().websocket("/ws") as raw:
            ws = Socket(raw)
            await ws.recv()
            await ws.send({"type": "message", "text": "[[fake:hang_after=1]] slow"})
            frames = await ws.until_done(timeout_s=10)
    assert [f["code"] for f in frames if f["type"] == "error"] == ["upstream_timeout"]
    assert frames[-1]["reason"] == "error"


async def test_wrong_origin_is_refused_before_accept(app) -> None:
    client = app.test_client()
    with pytest.raises(WebsocketResponseError) as refused:
        async with client.websocket(
            "/ws", headers={"Origin": "https://evil.example", "Host": "chat.example"}
        ):
            pass
    assert refused.value.response.status_code == 403
    assert await refused.value.response.get_data(as_text=True) == "403 origin not allowed\n"


async def test_same_origin_and_listed_origins_are_allowed(app_with, settings) -> None:
    listed = settings.replace(allowed_origins=("https://app.example",))
    async with app_with(listed) as app:
        client = app.test_client()
        for origin in ("https://chat.example", "https://app.example"):
            headers = {"Origin": origin, "Host": "chat.example"}
            async with client.websocket("/ws", headers=headers) as raw:
                assert (await Socket(raw).recv())["type"] == "ready"


@pytest.mark.parametrize("after", ["-1", "x", "²", "1" * 30])
async def test_bad_after_is_refused_with_400(app, after: str) -> None:
    with pytest.raises(WebsocketResponseError) as refused:
        async with app.test_client().websocket("/ws", query_string={"after": after}):
            pass
    assert refused.value.response.status_code == 400


async def test_stop_works_whatever_the_message_id_holds(connect, fake: FakeOpenAI) -> None:
    fake.configure(chunks=200, interval_ms=50)
    async with connect() as (ws, _):
        await ws.send({"type": "message", "id": "a|b|c", "text": "talk"})
        await ws.until(lambda f: f["type"] == "delta")
        await ws.send({"type": "stop"})
        frames = await ws.until_done()
    assert frames[-1] == {"type": "done", "seq": frames[-1]["seq"], "reply_to": "a|b|c",
                          "reason": "cancelled"}  # fmt: skip


async def test_a_message_to_an_expired_session_says_so_and_closes(app_with, settings) -> None:
    # Long enough that no gap within the first reply outlasts it on a loaded machine (1 s did,
    # once, on the cluster: the session expired mid-reply), short enough to wait out.
    async with app_with(settings.replace(session_ttl_s=3)) as app:
        client = app.test_client()
        async with client.websocket("/ws") as raw:
            ws = Socket(raw)
            ready = await ws.recv()
            await ws.send({"type": "message", "text": "stored now"})  # stored with its first
            await ws.until_done()
            await asyncio.sleep(3.5)  # idle past SESSION_TTL_S: the behaviour under test
            await ws.send({"type": "message", "id": "late", "text": "still there?"})
            error = await ws.recv()
            assert (error["type"], error["code"], error["id"]) == (
                "error",
                "session_expired",
                "late",
            )
            with pytest.raises(WebsocketDisconnectError):
                await ws.recv()
        async with client.websocket("/ws", query_string={"session": ready["session"]}) as raw:
            fresh = await Socket(raw).recv()
    assert fresh["session"] != ready["session"]
    assert fresh["seq"] == 0


async def test_shutdown_closes_streaming_replies_as_interrupted(
    app_with, settings, fake: FakeOpenAI
) -> None:
    fake.configure(chunks=100, interval_ms=50)
    async with app_with(settings) as app:
        async with app.test_client().websocket("/ws") as raw:
            ws = Socket(raw)
            ready = await ws.recv()
            await ws.send({"type": "message", "text": "long"})
            await ws.until(lambda f: f["type"] == "delta")
        service = runtime_of(app.app).service
        broker = service.broker
    # The app has shut down; its broker still holds the log (in-process backend).
    events = await broker.replay(ready["session"], 0)
    assert events[-1].data["type"] == "done"
    assert events[-1].data["reason"] == "interrupted"
    record = await fake.wait_request(1, ended=True)
    assert record["status"] == "aborted"


async def test_concurrent_sessions_are_independent(connect) -> None:
    async def chat(n: int) -> str:
        async with connect() as (ws, _):
            await ws.send({"type": "message", "text": f"session {n}"})
            return text_of(await ws.until_done())

    texts = await asyncio.gather(*(chat(n) for n in range(20)))
    assert texts == [reply_text(f"session {n}", 5) for n in range(20)]


async def test_ping_gets_pong(connect) -> None:
    async with connect() as (ws, _):
        await ws.send({"type": "ping"})
        assert await ws.recv() == {"type": "pong"}


async def test_a_silent_socket_is_closed_as_dead(app_with, settings) -> None:
    async with app_with(settings.replace(ws_idle_timeout_s=0.3)) as app:
        async with app.test_client().websocket("/ws") as raw:
            ws = Socket(raw)
            await ws.recv()
            await ws.send({"type": "ping"})  # a heartbeat keeps it open
            assert await ws.recv() == {"type": "pong"}
            with pytest.raises(WebsocketDisconnectError):
                await ws.recv(timeout_s=3)


async def test_a_closed_socket_is_freed_without_the_cyclic_gc(app_with, fake: FakeOpenAI) -> None:
    """A closed socket's objects go by reference counting alone: no reference cycle (a frame
    holding its own task, kept alive by that task's CancelledError) waits for the collector."""
    settings = Settings(openai_base_url=fake.base_url, openai_api_key="sk-test")
    gc.collect()
    gc.disable()
    try:
        async with app_with(settings) as app, app.test_client().websocket("/ws") as raw:
            ws = Socket(raw)
            assert (await ws.recv())["type"] == "ready"
            await ws.send({"type": "ping"})
            assert (await ws.recv())["type"] == "pong"

        async def freed() -> bool:  # once the server's handler has closed the socket
            return not any(isinstance(o, Feed) for o in gc.get_objects())

        await wait_until(freed)
    finally:
        gc.enable()
