"""Abuse limits: message rates per session and IP, the token budget, sockets per IP."""

from __future__ import annotations

import asyncio

import pytest
from quart.testing.connections import WebsocketResponseError

from chatbot.chat.limits import client_ip
from chatbot.fake_openai import FakeOpenAI
from chatbot.settings import Settings

from .conftest import Socket


@pytest.mark.parametrize(
    ("peer", "forwarded", "hops", "expected"),
    [
        ("10.0.0.1", "", 0, "10.0.0.1"),
        ("10.0.0.1", "6.6.6.6", 0, "10.0.0.1"),  # no trusted proxy: the header is ignored
        ("10.0.0.1", "1.1.1.1", 1, "1.1.1.1"),
        ("10.0.0.1", "6.6.6.6, 1.1.1.1", 1, "1.1.1.1"),  # the client wrote 6.6.6.6 itself
        ("10.0.0.1", "6.6.6.6, 1.1.1.1, 10.0.0.2", 2, "1.1.1.1"),
        ("10.0.0.1", "", 1, "10.0.0.1"),
        # HAProxy adds a header line of its own after the client's: the lines are one list.
        ("10.0.0.1", ["6.6.6.6", "1.1.1.1"], 1, "1.1.1.1"),
        ("10.0.0.1", ["6.6.6.6, 7.7.7.7", "1.1.1.1, 10.0.0.2"], 2, "1.1.1.1"),
    ],
)
def test_client_ip_trusts_only_the_configured_proxy_hops(
    peer: str, forwarded: str | list[str], hops: int, expected: str
) -> None:
    lines = [forwarded] if isinstance(forwarded, str) else forwarded
    assert client_ip(peer, lines, hops) == expected


async def test_messages_per_session_are_limited_before_anything_is_stored(
    app_with, settings, fake: FakeOpenAI
) -> None:
    async with app_with(settings.replace(rate_limit_session="3/minute")) as app:
        async with app.test_client().websocket("/ws") as raw:
            ws = Socket(raw)
            await ws.recv()
            for n in range(3):
                await ws.send({"type": "message", "text": f"ok {n}"})
                await ws.until_done()
            await ws.send({"type": "message", "id": "fourth", "text": "one too many"})
            refused = await ws.recv()
    assert (refused["type"], refused["code"], refused["id"]) == ("error", "rate_limited", "fourth")
    assert 0 < refused["retry_after"] <= 60
    assert "seq" not in refused
    assert len(fake.requests) == 3


async def test_messages_per_ip_count_across_sessions_behind_a_trusted_proxy(
    app_with, settings, fake: FakeOpenAI
) -> None:
    limited = settings.replace(rate_limit_ip="2/minute", trusted_proxy_hops=1)
    async with app_with(limited) as app:
        client = app.test_client()
        codes = []
        for forwarded in ("1.1.1.1", "1.1.1.1", "6.6.6.6, 1.1.1.1", "2.2.2.2"):
            async with client.websocket("/ws", headers={"X-Forwarded-For": forwarded}) as raw:
                ws = Socket(raw)
                await ws.recv()
                await ws.send({"type": "message", "text": "hi"})
                frame = await ws.recv()
                codes.append(frame.get("code", frame["type"]))
                if frame["type"] == "user":
                    await ws.until_done()
    assert codes == ["user", "user", "rate_limited", "user"]


async def test_the_token_budget_of_a_session(app_with, settings, fake: FakeOpenAI) -> None:
    async with app_with(settings.replace(session_token_budget="40/day")) as app:
        async with app.test_client().websocket("/ws") as raw:
            ws = Socket(raw)
            await ws.recv()
            await ws.send({"type": "message", "text": "a question of some length " * 4})
            await ws.until_done()
            await ws.send({"type": "message", "text": "and another"})
            refused = await ws.recv()
    assert refused["code"] == "rate_limited"
    assert "budget" in refused["message"]
    assert len(fake.requests) == 1


async def test_sockets_per_ip_are_limited_before_accept(app_with, settings) -> None:
    async with app_with(settings.replace(max_sockets_per_ip=2)) as app:
        client = app.test_client()
        async with client.websocket("/ws") as first, client.websocket("/ws") as second:
            for raw in (first, second):
                assert (await Socket(raw).recv())["type"] == "ready"
            with pytest.raises(WebsocketResponseError) as refused:
                async with client.websocket("/ws") as third:
                    # Wait for the answer: leaving at once would hang up before it is given
                    # (the handshake's count is a broker round trip).
                    async with asyncio.timeout(5):
                        await third.receive()
            assert refused.value.response.status_code == 429
        async with client.websocket("/ws") as again:  # places are given back on close
            assert (await Socket(again).recv())["type"] == "ready"


async def test_http_chat_is_limited_per_ip_with_retry_after(app_with, settings) -> None:
    async with app_with(settings.replace(rate_limit_ip="1/minute")) as app:
        client = app.test_client()
        assert (await client.post("/chat", json={"message": "hi"})).status_code == 200
        refused = await client.post("/chat", json={"message": "again"})
        assert refused.status_code == 429
        assert 0 < int(refused.headers["Retry-After"]) <= 60
        assert set(await refused.get_json()) == {"error"}
        asked = await client.post("/api/ask", json={"message": "and by ask"})
        assert asked.status_code == 429


async def test_limits_are_shared_by_instances_through_redis(
    app_with, redis_url: str, fake: FakeOpenAI
) -> None:
    limited = Settings(openai_base_url=fake.base_url, redis_url=redis_url, rate_limit_ip="2/minute")
    async with app_with(limited) as one, app_with(limited) as two:
        codes = []
        for app in (one, two, one):
            response = await app.test_client().post("/chat", json={"message": "hi"})
            codes.append(response.status_code)
    assert codes == [200, 200, 429]


async def test_a_reply_spends_its_tokens_and_an_overdraft_spends_exactly_the_rest(
    settings,
) -> None:
    from chatbot.broker.memory import MemoryBroker
    from chatbot.chat.limits import AbuseLimits

    broker = MemoryBroker(history_turns=4, log_max_events=100, session_ttl_s=60)
    limits = AbuseLimits(settings.replace(session_token_budget="100/day"), broker)

    async def left() -> int:
        stats = await limits._limiter.get_window_stats(limits._budget, "budget", "s")
        return stats.remaining

    await limits.charge_tokens("s", 30)
    assert await left() == 70
    await limits.charge_tokens("s", 500)
    assert await left() == 0
    await limits.charge_tokens("s", 5)  # nothing left to spend: no error either
    assert await left() == 0


async def test_a_new_session_does_not_reset_the_address_token_budget(
    app_with, settings, fake: FakeOpenAI
) -> None:
    """SESSION_TOKEN_BUDGET alone never binds: a fresh session costs one handshake."""
    budgets = settings.replace(session_token_budget="1000000/day", ip_token_budget="40/day")
    async with app_with(budgets) as app:
        client = app.test_client()
        async with client.websocket("/ws") as raw:
            ws = Socket(raw)
            await ws.recv()
            await ws.send({"type": "message", "text": "a question of some length " * 4})
            await ws.until_done()
        async with client.websocket("/ws") as raw:  # a new session, the same address
            ws = Socket(raw)
            await ws.recv()
            await ws.send({"type": "message", "id": "again", "text": "and another"})
            refused = await ws.recv()
    assert (refused["code"], refused["id"]) == ("rate_limited", "again")
    assert "this address has used its token budget" in refused["message"]
    assert refused["retry_after"] > 0
    assert len(fake.requests) == 1


async def test_one_address_cannot_fill_every_reply_slot(app_with, settings) -> None:
    """Sessions from one address that each start a long reply and leave: past
    MAX_REPLIES_PER_IP the next is refused, and another address still gets its reply."""
    capped = settings.replace(max_replies_per_ip=2, trusted_proxy_hops=1)
    async with app_with(capped) as app:
        client = app.test_client()
        codes = []
        for n in range(3):
            async with client.websocket("/ws", headers={"X-Forwarded-For": "1.1.1.1"}) as raw:
                ws = Socket(raw)
                await ws.recv()
                await ws.send({"type": "message", "text": f"long {n} [[fake:chunks=400]]"})
                frame = await ws.recv()
                codes.append(frame.get("code", frame["type"]))
        assert codes == ["user", "user", "rate_limited"]
        assert "too many replies in progress from this address" in frame["message"]
        async with client.websocket("/ws", headers={"X-Forwarded-For": "2.2.2.2"}) as raw:
            ws = Socket(raw)
            await ws.recv()
            await ws.send({"type": "message", "text": "mine"})
            assert (await ws.until_done())[-1]["reason"] == "stop"
