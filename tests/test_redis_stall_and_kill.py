"""Redis calls that may run twice, and counts that must outlive no instance: real redis-server
(stalled with SIGSTOP past REDIS_TIMEOUT_S), real Hypercorn instances (killed with -9)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import redis.asyncio as aioredis
import websockets

from chatbot.fake_openai import reply_text

from .support.frames import seqs, text_of
from .support.procs import ChatbotProcess, FakeOpenAIProcess, RedisProcess

TIMEOUT_S = 30.0
STALL_S = 3.0  # past REDIS_TIMEOUT_S (1 s) twice over: the batch and its retry both time out
SOCKETS_KEY = "chatbot:limits:sockets:127.0.0.1"
SOCKETS = 30


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    fake = FakeOpenAIProcess("--ttft-ms", "0", "--chunks", "5", "--interval-ms", "10").start()
    yield fake
    fake.stop()


class Socket:
    def __init__(self, ws: websockets.ClientConnection, ready: dict) -> None:
        self.ws = ws
        self.session: str = ready["session"]
        self.frames: list[dict] = []

    async def send(self, text: str, msg_id: str) -> None:
        await self.ws.send(json.dumps({"type": "message", "id": msg_id, "text": text}))

    async def until(self, kind: str, msg_id: str) -> dict:
        """Frames until one of `kind` about `msg_id` (or an error frame about it, returned)."""
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                frame = json.loads(await self.ws.recv())
                self.frames.append(frame)
                about = frame.get("reply_to", frame.get("id"))
                if about == msg_id and frame["type"] in (kind, "error"):
                    return frame


@asynccontextmanager
async def socket(url: str) -> AsyncIterator[Socket]:
    async with asyncio.timeout(TIMEOUT_S):
        ws = await websockets.connect(url)
        ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    try:
        yield Socket(ws, ready)
    finally:
        await ws.close()


async def _count(admin: aioredis.Redis, key: str) -> int:
    """What the service counts for `key`: the shares of live instances (main kept one integer)."""
    if await admin.type(key) == "string":
        return int(await admin.get(key) or 0)
    alive = {m for m, until in await admin.zrange("chatbot:instances", 0, -1, withscores=True)
             if until > time.time() * 1000}  # fmt: skip
    shares = await admin.hgetall(key)
    return sum(int(v.split(":")[1]) for k, v in shares.items() if k in alive)


def _env(redis: RedisProcess, upstream: FakeOpenAIProcess, **settings: str) -> dict[str, str]:
    """Short Redis timeouts, so that a stall outlasts them and a dead instance lapses soon."""
    env = {"REDIS_URL": redis.url, "OPENAI_BASE_URL": upstream.base_url}
    return env | {"REDIS_TIMEOUT_S": "1", "REDIS_CANARY_INTERVAL_S": "0.5", **settings}


def _stall(redis: RedisProcess) -> None:
    os.kill(redis.pid, signal.SIGSTOP)


def _resume(redis: RedisProcess) -> None:
    os.kill(redis.pid, signal.SIGCONT)


async def test_a_redis_stall_past_the_timeout_applies_nothing_twice(
    upstream: FakeOpenAIProcess,
) -> None:
    redis = RedisProcess().start()
    # 30 sessions, some of them refused once (unavailable) and counted again: not the subject.
    env = _env(redis, upstream, GENERATION_LEASE_S="10", RATE_LIMIT_NEW_SESSIONS="1000/minute")
    server = ChatbotProcess(env).start()
    long = "streaming [[fake:chunks=40]] [[fake:interval_ms=50]]"
    try:
        async with aioredis.from_url(redis.url, decode_responses=True) as admin:
            async with AsyncExitStack() as stack:
                sockets = [
                    await stack.enter_async_context(socket(server.ws_url)) for _ in range(SOCKETS)
                ]
                streaming, *others = sockets
                await streaming.send(long, "m1")
                await streaming.until("delta", "m1")

                async def message(n: int, sock: Socket) -> None:
                    await asyncio.sleep(n * 0.01)
                    await sock.send(f"message {n}", "m1")

                async def stall_then_handshake() -> None:
                    await asyncio.sleep(len(others) * 0.005)
                    _stall(redis)
                    with pytest.raises(websockets.InvalidStatus) as refused:
                        async with asyncio.timeout(TIMEOUT_S):
                            await websockets.connect(server.ws_url, open_timeout=TIMEOUT_S)
                    assert refused.value.response.status_code == 503

                # Redis stops while messages arrive, one every 10 ms: some are stalled before
                # their lease, some with it (its answer lost), some after; a reply streams, a
                # socket opens. Every call in flight then is sent again, and runs twice.
                try:
                    await asyncio.gather(
                        *(message(n, sock) for n, sock in enumerate(others)),
                        stall_then_handshake(),
                    )
                    await asyncio.sleep(STALL_S)
                finally:
                    _resume(redis)
                assert (await streaming.until("done", "m1"))["reason"] == "stop"
                accepted = [streaming]
                for sock in others:
                    first = await sock.until("user", "m1")
                    if first["type"] == "user":
                        assert (await sock.until("done", "m1"))["reason"] == "stop"
                        accepted.append(sock)
                    else:  # refused before anything was stored: its client sends it again
                        assert first["code"] == "unavailable", first
                # No phantom lease: the next message of every session is taken at once.
                for sock in sockets:
                    await sock.send("again", "m2")
                    assert (await sock.until("user", "m2"))["type"] == "user", sock.frames[-1]
                    assert (await sock.until("done", "m2"))["reason"] == "stop"
                for sock in sockets:
                    # No event twice, none missing, no `done` without its `user`.
                    got = seqs(sock.frames)
                    assert got == list(range(got[0], got[0] + len(got)))
                    kinds = [f["type"] for f in sock.frames if f["type"] in ("user", "done")]
                    assert kinds == ["user", "done"] * (2 if sock in accepted else 1), kinds
                    hist = await admin.lrange(f"chatbot:s:{sock.session}:hist", 0, -1)
                    roles = [json.loads(turn)["role"] for turn in hist]
                    assert roles == ["user", "assistant"] * (2 if sock in accepted else 1)
                assert text_of(streaming.frames, "m1") == reply_text("streaming", 40)
                assert await admin.hlen("chatbot:lease") == 0
                assert await _count(admin, SOCKETS_KEY) == SOCKETS
            await _wait_count(admin, 0)
    finally:
        print(server.output()[-20000:])  # shown by pytest when the test fails
        server.stop()
        redis.stop()


async def _wait_count(admin: aioredis.Redis, expected: int, timeout_s: float = 10.0) -> float:
    """Seconds until the sockets of 127.0.0.1 count `expected`."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while await _count(admin, SOCKETS_KEY) != expected:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_a_killed_instance_gives_its_socket_places_back(
    upstream: FakeOpenAIProcess,
) -> None:
    redis = RedisProcess().start()
    env = _env(redis, upstream, MAX_SOCKETS_PER_IP="3")
    doomed, survivor = ChatbotProcess(env).start(), ChatbotProcess(env).start()
    try:
        async with aioredis.from_url(redis.url, decode_responses=True) as admin:
            async with socket(doomed.ws_url), socket(doomed.ws_url), socket(doomed.ws_url):
                with pytest.raises(websockets.InvalidStatus) as refused:
                    async with socket(survivor.ws_url):
                        pass
                assert refused.value.response.status_code == 429
                doomed.kill()
                # Its share stops counting once it has not said it is alive for 3 canary
                # intervals + REDIS_TIMEOUT_S (2.5 s here).
                healed_s = await _wait_count(admin, 0)
                assert healed_s < 5.0
                async with socket(survivor.ws_url), socket(survivor.ws_url):
                    async with socket(survivor.ws_url):
                        assert await _count(admin, SOCKETS_KEY) == 3
    finally:
        for process in (doomed, survivor, redis):
            process.stop()
