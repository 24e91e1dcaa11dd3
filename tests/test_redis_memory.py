"""A small Redis (`maxmemory`, `noeviction`) is not filled by handshakes nor by a model that never
stops (issue #13, item 8): real redis-server, real Hypercorn, the fake model as a process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis
import websockets

from chatbot.fake_openai import reply_text

from .support.frames import text_of
from .support.procs import ChatbotProcess, FakeOpenAIProcess, RedisProcess
from .support.waiting import wait_until

TIMEOUT_S = 30.0
HEADROOM = 1024 * 1024  # what the test leaves a Redis that holds nothing yet


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    fake = FakeOpenAIProcess("--ttft-ms", "0", "--chunks", "3", "--interval-ms", "0").start()
    yield fake
    fake.stop()


@asynccontextmanager
async def small_redis_and_server(
    upstream: FakeOpenAIProcess, **settings: str
) -> AsyncIterator[tuple[aioredis.Redis, ChatbotProcess]]:
    """A chatbot on a Redis whose `maxmemory` is HEADROOM above what it uses once serving."""
    redis = RedisProcess().start()
    env = {"REDIS_URL": redis.url, "OPENAI_BASE_URL": upstream.base_url, **settings}
    server = ChatbotProcess(env).start()
    try:
        async with aioredis.from_url(redis.url, decode_responses=True) as admin:
            await chat(server, "warm up")  # the scripts loaded, the limits' keys made
            used = (await admin.info("memory"))["used_memory"]
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", used + HEADROOM)
            yield admin, server
    finally:
        server.stop()
        redis.stop()


async def chat(server: ChatbotProcess, text: str) -> list[dict]:
    async with asyncio.timeout(TIMEOUT_S):
        async with websockets.connect(server.ws_url, max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(json.dumps({"type": "message", "text": text}))
            frames = [json.loads(await ws.recv())]
            while frames[-1]["type"] != "done":
                frames.append(json.loads(await ws.recv()))
            return frames


async def test_a_flood_of_handshakes_stores_no_session(upstream: FakeOpenAIProcess) -> None:
    # The handshake rate limit is not the subject: 2,000 in a few seconds.
    limits = {"MAX_SOCKETS_PER_IP": "1000", "RATE_LIMIT_HANDSHAKES_IP": "100000/minute"}
    async with small_redis_and_server(upstream, **limits) as (admin, server):
        before = (await admin.info("memory"))["used_memory"]
        sessions = {key async for key in admin.scan_iter("chatbot:s:*")}

        async def handshakes(n: int) -> None:
            for _ in range(n):
                async with asyncio.timeout(TIMEOUT_S):
                    async with websockets.connect(server.ws_url) as ws:
                        assert json.loads(await ws.recv())["type"] == "ready"

        await asyncio.gather(*(handshakes(100) for _ in range(20)))  # 2,000 sockets

        async def only_the_warm_up_session() -> bool:  # a socket's `subs` entry goes as it closes
            return {key async for key in admin.scan_iter("chatbot:s:*")} == sessions

        await wait_until(only_the_warm_up_session, timeout_s=10)
        assert (await admin.info("memory"))["used_memory"] - before < HEADROOM / 4
        frames = await chat(server, "still room?")  # and everyone else is served
        assert frames[-1]["reason"] == "stop"


async def test_a_model_that_never_stops_is_cut_before_it_fills_redis(
    upstream: FakeOpenAIProcess,
) -> None:
    cap = 200_000
    endless = "go [[fake:chunks=20000]] [[fake:pad=1000]]"  # 20 MB, as fast as it can
    async with small_redis_and_server(upstream, MAX_REPLY_CHARS=str(cap)) as (admin, server):
        frames = await chat(server, endless)
        assert frames[-1]["reason"] == "length"
        assert len(text_of(frames)) == cap
        # The log and the history hold the reply; well within the headroom.
        info = await admin.info("memory")
        assert info["used_memory"] < info["maxmemory"]
        assert (await chat(server, "next"))[-1]["reason"] == "stop"


async def test_a_piece_larger_than_the_socket_backlog_reaches_a_fast_reader_whole(
    upstream: FakeOpenAIProcess,
) -> None:
    # One piece of the model's of 60,000 characters, 3.7 times the socket's backlog: it goes
    # out as deltas of at most SOCKET_BACKLOG_BYTES / 12 characters (it closed the socket, 1013).
    async with small_redis_and_server(upstream, SOCKET_BACKLOG_BYTES="16384") as (_, server):
        frames = await chat(server, "big [[fake:chunks=2]] [[fake:pad=60000]]")
    deltas = [f["text"] for f in frames if f["type"] == "delta"]
    assert frames[-1]["reason"] == "stop"
    assert "".join(deltas) == reply_text("big", 2, pad=60000)
    assert max(len(d) for d in deltas) <= 16384 // 12
