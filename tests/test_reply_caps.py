"""Bounds on what a client and a model can make the service store: new sessions per address,
the length and duration of a reply, the size of a delta (issue #13, item 8). In-process, both
brokers."""

from __future__ import annotations

from chatbot.fake_openai import FakeOpenAI, reply_chunks

from .conftest import Socket, text_of


async def _chat(app, text: str, *, timeout_s: float = 20.0) -> list[dict]:  # type: ignore[no-untyped-def]
    async with app.test_client().websocket("/ws") as raw:
        ws = Socket(raw)
        await ws.recv()
        await ws.send({"type": "message", "text": text})
        return await ws.until(lambda f: f["type"] in ("done", "error"), timeout_s)


async def test_new_sessions_per_address_are_limited(app_with, settings) -> None:
    async with app_with(settings.replace(rate_limit_new_sessions="3/minute")) as app:
        outcomes = [(await _chat(app, f"hello {n}"))[-1] for n in range(4)]
        client = app.test_client()
        asked = [await client.post("/api/ask", json={"message": "hi"}) for _ in range(4)]
        # An open socket that says nothing starts no session: it is not counted.
        async with client.websocket("/ws") as raw:
            assert (await Socket(raw).recv())["type"] == "ready"
    assert [f["type"] for f in outcomes] == ["done", "done", "done", "error"]
    assert (outcomes[-1]["code"], outcomes[-1]["retry_after"] > 0) == ("rate_limited", True)
    assert "new sessions" in outcomes[-1]["message"]
    assert [reply.status_code for reply in asked] == [202, 202, 202, 429]


async def test_max_reply_tokens_is_sent_upstream(app_with, settings, fake: FakeOpenAI) -> None:
    async with app_with(settings.replace(max_reply_tokens=3)) as app:
        frames = await _chat(app, "count [[fake:chunks=10]]")
    assert frames[-1]["reason"] == "length"
    assert text_of(frames) == "".join(reply_chunks("count", 10)[:3])  # the fake obeyed it


async def test_an_endless_reply_ends_at_max_reply_chars(
    app_with, settings, fake: FakeOpenAI
) -> None:
    endless = "go [[fake:chunks=1000000]] [[fake:interval_ms=0]] [[fake:pad=100]]"
    async with app_with(settings.replace(max_reply_chars=5000)) as app:
        frames = await _chat(app, endless)
    assert frames[-1]["reason"] == "length"
    assert len(text_of(frames)) == 5000
    record = await fake.wait_request(1, ended=True)
    assert record["status"] == "aborted"  # the upstream request was closed, not read to the end


async def test_a_slow_endless_reply_ends_at_max_reply_s(
    app_with, settings, fake: FakeOpenAI
) -> None:
    slow = "go [[fake:chunks=100000]] [[fake:interval_ms=50]]"  # 83 minutes
    async with app_with(settings.replace(max_reply_s=1.0)) as app:
        frames = await _chat(app, slow)
    assert frames[-1]["reason"] == "length"
    assert 0 < len([f for f in frames if f["type"] == "delta"]) < 100


async def test_a_delta_larger_than_the_socket_backlog_is_split(
    app_with, settings, fake: FakeOpenAI
) -> None:
    big = "big [[fake:chunks=3]] [[fake:pad=30000]]"  # two pieces of 30,000+ characters
    async with app_with(settings.replace(socket_backlog_bytes=8192)) as app:
        frames = await _chat(app, big)  # read as fast as it comes: never closed as too slow
    deltas = [f["text"] for f in frames if f["type"] == "delta"]
    assert frames[-1]["reason"] == "stop"
    assert "".join(deltas) == "".join(reply_chunks("big", 3, pad=30000))
    assert max(len(d) for d in deltas) <= 8192 // 12
