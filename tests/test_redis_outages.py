"""Redis outages and restarts against real processes: two Hypercorn instances on one redis-server.

Each outage here outlasts every Redis timeout of the instances (REDIS_TIMEOUT_S and the canary
deadline, 3 x REDIS_CANARY_INTERVAL_S + REDIS_TIMEOUT_S), which is what users meet when Redis is
restarted or fails over, and what no retry inside one call rides out.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
import websockets

from chatbot.fake_openai import parse_prompt, reply_text

from .support.frames import FrameReader, seqs, text_of
from .support.procs import ChatbotProcess, FakeOpenAIProcess, RedisProcess, free_port
from .support.waiting import readiness, wait_ready, wait_until

REDIS_TIMEOUT_S = 1.0
CANARY_INTERVAL_S = 0.5
CANARY_DEADLINE_S = 3 * CANARY_INTERVAL_S + REDIS_TIMEOUT_S
OUTAGE_S = 2 * CANARY_DEADLINE_S + 1  # 6 s: past every timeout, twice the canary deadline
BACK_WITHIN_S = 10.0  # readiness returns within this of Redis's return
ENV = {
    "REDIS_TIMEOUT_S": str(REDIS_TIMEOUT_S),
    "REDIS_CANARY_INTERVAL_S": str(CANARY_INTERVAL_S),
    "GENERATION_LEASE_S": "2",
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    fake = FakeOpenAIProcess("--ttft-ms", "20", "--chunks", "5", "--interval-ms", "10").start()
    yield fake
    fake.stop()


def expected(message: str, chunks: int = 5) -> str:
    return reply_text(parse_prompt(message)[0], chunks)


class Socket(FrameReader):
    timeout_s = 15.0

    def __init__(self, ws: Any, ready: dict[str, Any]) -> None:
        self.ws = ws
        self.ready = ready
        self.session: str = ready["session"]

    async def _receive(self) -> str | bytes:
        return await self.ws.recv()  # type: ignore[no-any-return]

    async def say(self, text: str, msg_id: str | None = None) -> None:
        frame = {"type": "message", "text": text} | ({"id": msg_id} if msg_id else {})
        await self.ws.send(json.dumps(frame))

    async def closed(self) -> int | None:
        """The close code, once the server has closed the socket (no frame may come first)."""
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await self.recv()
        return closed.value.rcvd.code if closed.value.rcvd else None


@asynccontextmanager
async def connect(
    server: ChatbotProcess, session: str | None = None, **query: Any
) -> AsyncIterator[Socket]:
    params = {"session": session, **query}
    url = server.ws_url + "?" + "&".join(f"{k}={v}" for k, v in params.items() if v is not None)
    async with asyncio.timeout(15):
        ws = await websockets.connect(url, open_timeout=10)
        ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    try:
        yield Socket(ws, ready)
    finally:
        async with asyncio.timeout(5):
            await ws.close()


async def wait_unready(server: ChatbotProcess) -> None:
    async def unready() -> bool:
        return (await readiness(server))["http_status"] == 503

    await wait_until(unready, timeout_s=15)


def instances(redis_url: str, upstream: FakeOpenAIProcess, n: int = 2) -> list[ChatbotProcess]:
    env = {**ENV, "REDIS_URL": redis_url, "OPENAI_BASE_URL": upstream.base_url}
    return [ChatbotProcess(env, name=f"chatbot-{i}") for i in range(1, n + 1)]


async def test_an_outage_longer_than_every_timeout_heals_without_a_restart(
    upstream: FakeOpenAIProcess,
) -> None:
    """Redis killed (its data kept) for longer than every timeout, then started again: both
    instances turn ready within 10 s of its return, and a socket open all along, on the
    instance that does not generate, receives the next reply whole."""
    redis = RedisProcess(durable=True).start()
    one, two = servers = instances(redis.url, upstream)
    try:
        for server in servers:
            server.start()
        await wait_ready(servers, 15)
        async with connect(one) as a, connect(two, a.session) as b:
            await a.say("before")
            before = await b.until_done()
            assert text_of(before) == expected("before")
            await a.until_done()
            redis.kill()
            for server in servers:
                await wait_unready(server)
            await asyncio.sleep(OUTAGE_S)
            redis.start()
            await wait_ready(servers, BACK_WITHIN_S)
            await a.say("after")
            frames = await b.until_done()
            assert text_of(frames) == expected("after")
            first = seqs(before)[-1] + 1  # nothing lost, nothing twice
            assert seqs(frames) == list(range(first, first + len(frames)))
            assert text_of(await a.until_done()) == expected("after")
            # A new socket on either instance is live too.
            async with connect(two, a.session) as c:
                await c.say("new socket")
                assert text_of(await c.until_done()) == expected("new socket")
    finally:
        for process in (*servers, redis):
            process.stop()


async def test_an_instance_started_while_redis_is_down_serves_once_it_is_up(
    upstream: FakeOpenAIProcess,
) -> None:
    port = free_port()
    redis = RedisProcess(port)
    (server,) = servers = instances(redis.url, upstream, n=1)
    try:
        server.start()  # /healthz answers: the process lives, Redis or not
        assert (await readiness(server))["http_status"] == 503
        await asyncio.sleep(OUTAGE_S)
        redis.start()
        await wait_ready(servers, BACK_WITHIN_S)
        async with connect(server) as a:
            await a.say("first words")
            assert text_of(await a.until_done()) == expected("first words")
    finally:
        for process in (*servers, redis):
            process.stop()


async def attempt(server: ChatbotProcess) -> str:
    """Open a socket and classify what the client saw: refused at the handshake (`http 503`),
    closed before `ready` (`close 1013`), or `live` (`ready`, then a reply to a message, whole).
    Anything else (`ready` then a close, another code) is returned as a description."""
    try:
        async with asyncio.timeout(30):
            ws = await websockets.connect(server.ws_url, open_timeout=15)
    except websockets.InvalidStatus as exc:
        return f"http {exc.response.status_code}"
    try:
        async with asyncio.timeout(30):
            try:
                first = json.loads(await ws.recv())
            except websockets.ConnectionClosed as exc:
                return f"close {exc.rcvd.code if exc.rcvd else None}"
            if first["type"] != "ready":
                return f"first frame {first}"
            sock = Socket(ws, first)
            await sock.say("are you live?")
            try:
                frames = await sock.until_done()
            except websockets.ConnectionClosed as exc:
                return f"ready, then close {exc.rcvd.code if exc.rcvd else None}"
            return "live" if text_of(frames) == expected("are you live?") else f"{frames}"
    finally:
        async with asyncio.timeout(5):
            await ws.close()


async def attempts_during(server: ChatbotProcess, fault: Any, every_s: float = 0.2) -> list[str]:
    """Sockets opened one after another (not waiting for each other) while `fault()` runs."""
    opened: list[asyncio.Task[str]] = []
    done = asyncio.ensure_future(fault())
    while not done.done():
        opened.append(asyncio.ensure_future(attempt(server)))
        await asyncio.sleep(every_s)
    await done
    return list(await asyncio.gather(*opened))


def errors_logged(server: ChatbotProcess) -> list[str]:
    return [
        line
        for line in server.output().splitlines()
        if '"level": "ERROR"' in line or "Traceback" in line
    ]


async def test_ready_means_live_a_socket_opening_in_a_redis_blip_is_told_to_retry(
    upstream: FakeOpenAIProcess,
) -> None:
    """Sockets open one after another while Redis is paused (SIGSTOP) past REDIS_TIMEOUT_S and
    then while it answers commands but refuses the subscription: each is refused (HTTP 503),
    closed with 1013 before `ready`, or gets `ready` and is live; never `ready` then 1011, and
    the instance logs no error."""
    redis = RedisProcess().start()
    (server,) = servers = instances(redis.url, upstream, n=1)
    try:
        server.start()
        await wait_ready(servers, 15)

        async def pause() -> None:
            redis.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            await asyncio.sleep(3 * REDIS_TIMEOUT_S)
            redis.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            await wait_ready(servers, BACK_WITHIN_S)

        outcomes = await attempts_during(server, pause)
        assert set(outcomes) <= {"http 503", "close 1013", "live"}, outcomes
        assert "http 503" in outcomes and outcomes[-1] == "live", outcomes

        # Redis answers commands but cannot confirm a subscription (its pub/sub refused): the
        # sessions open, and their sockets are closed with 1013 instead of being handed `ready`.
        async with redis_admin(redis) as admin:
            await admin.execute_command("ACL", "SETUSER", "default", "resetchannels")
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await wait_unready(server)
            assert await attempt(server) == "close 1013"
            await admin.execute_command("ACL", "SETUSER", "default", "allchannels")
        await wait_ready(servers, BACK_WITHIN_S)
        assert await attempt(server) == "live"
        assert not errors_logged(server)
        assert "socket refused, not live" in server.output()
    finally:
        for process in (*servers, redis):
            process.stop()


@asynccontextmanager
async def redis_admin(redis: RedisProcess) -> AsyncIterator[Any]:
    client = aioredis.from_url(redis.url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


LONG = "[[fake:chunks=60]] [[fake:interval_ms=50]]"  # a reply of about 3 s


async def test_redis_restarting_empty_mid_reply_ends_the_reply_and_the_session_plainly(
    upstream: FakeOpenAIProcess,
) -> None:
    """Redis comes back empty (no persistence) while a reply streams: sockets on both instances
    hear the reply end `interrupted` and `session_expired`, then close; no hang, no seq reused.
    Both instances are ready again within 10 s, and a new session works."""
    redis = RedisProcess().start()
    servers = instances(redis.url, upstream)
    try:
        for server in servers:
            server.start()
        await wait_ready(servers, 15)
        one, two = servers
        async with connect(one) as a, connect(two, a.session) as b:
            await a.say(f"doomed {LONG}", "m1")
            seen = {a: await a.until(is_delta), b: await b.until(is_delta)}
            redis.restart()
            for sock, before in seen.items():
                frames = before + await sock.until(lambda f: f["type"] == "error")
                assert seqs(frames) == list(range(1, len(seqs(frames)) + 1))
                assert frames[-2:] == [
                    {"type": "done", "reply_to": "m1", "reason": "interrupted"},
                    {"type": "error", "code": "session_expired", "message": ANY_TEXT},
                ]
                assert await sock.closed() == 1000
        await wait_ready(servers, BACK_WITHIN_S)
        async with connect(two, a.session) as c:
            assert c.session != a.session and c.ready["seq"] == 0
            await c.say("a new start")
            assert text_of(await c.until_done()) == expected("a new start")
        for server in servers:
            assert not errors_logged(server)
    finally:
        for process in (*servers, redis):
            process.stop()


async def test_redis_restored_from_an_older_snapshot_starts_sockets_over_in_a_new_epoch(
    upstream: FakeOpenAIProcess,
) -> None:
    """SAVE, more events (a reply streaming), then Redis restarts from the saved file: its log
    ends before events the clients saw. Each socket hears the open reply end `interrupted`, then
    `resync` with a new epoch and the log as it is now, from seq 1; the next reply continues that
    log with no seq reused. A client resuming with the old epoch gets the whole log again."""
    redis = RedisProcess().start()  # no AOF: a restart loads the last snapshot (dump.rdb)
    servers = instances(redis.url, upstream)
    try:
        for server in servers:
            server.start()
        await wait_ready(servers, 15)
        one, two = servers
        async with connect(one) as a, connect(two, a.session) as b:
            await a.say("kept", "m1")
            kept = await b.until_done()
            assert kept == await a.until_done()
            async with redis_admin(redis) as admin:
                await admin.save()
            await a.say(f"lost {LONG}", "m2")
            seen = {a: await a.until(is_delta), b: await b.until(is_delta)}
            redis.restart()
            for sock, before in seen.items():
                frames = before + await sock.until(lambda f: f["type"] == "resync")
                resync = frames[-1]
                assert frames[-2] == {"type": "done", "reply_to": "m2", "reason": "interrupted"}
                assert resync["epoch"] != sock.ready["epoch"] and resync["seq"] == len(kept)
                assert await sock.until(lambda f: f["seq"] == len(kept)) == kept
            await wait_ready(servers, BACK_WITHIN_S)
            for server in servers:  # both instances are in the new epoch
                assert (await readiness(server))["broker"]["epoch"] == resync["epoch"]
            await b.say("after", "m3")
            for sock in (a, b):
                frames = await sock.until_done()
                assert seqs(frames) == list(range(len(kept) + 1, len(kept) + 1 + len(frames)))
                assert text_of(frames) == expected("after")
        # A client that comes back with the old epoch's seqs gets the whole log again.
        stale = {"after": seqs(seen[a])[-1], "epoch": a.ready["epoch"]}
        async with connect(one, a.session, **stale) as c:
            assert c.ready["epoch"] == resync["epoch"]
            replay = await c.until(lambda f: f["seq"] == c.ready["seq"])
            assert replay[: len(kept)] == kept and text_of(replay, "m3") == expected("after")
        for server in servers:
            assert not errors_logged(server)
    finally:
        for process in (*servers, redis):
            process.stop()


def is_delta(frame: dict[str, Any]) -> bool:
    return frame["type"] == "delta"


class _AnyText(str):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    __hash__ = str.__hash__


ANY_TEXT = _AnyText()


async def test_a_rollback_under_open_connections_writes_nothing_into_the_older_data(
    upstream: FakeOpenAIProcess,
) -> None:
    """Redis goes back to its snapshot while every connection stays open (`DEBUG RELOAD`, as a
    failover behind a connection-keeping proxy would): no new connection marks it, yet the
    streaming reply writes nothing more into the older data. The socket hears the reply end
    `interrupted`, then `resync` and exactly the snapshot's log; the next reply continues it."""
    redis = RedisProcess()
    redis.argv += ["--enable-debug-command", "local"]
    redis.start()
    (server,) = servers = instances(redis.url, upstream, n=1)
    try:
        server.start()
        await wait_ready(servers, 15)
        async with connect(server) as a:
            await a.say("kept", "m1")
            kept = await a.until_done()
            async with redis_admin(redis) as admin:
                await admin.save()
                await a.say(f"lost {LONG}", "m2")
                await a.until(is_delta)
                await admin.execute_command("DEBUG", "RELOAD", "NOSAVE")
            frames = await a.until(lambda f: f["type"] == "resync")
            assert frames[-2] == {"type": "done", "reply_to": "m2", "reason": "interrupted"}
            assert frames[-1]["seq"] == len(kept)  # not one delta of m2 went into the old data
            assert await a.until(lambda f: f["seq"] == len(kept)) == kept
            await a.say("after", "m3")
            frames = await a.until_done()
            assert seqs(frames) == list(range(len(kept) + 1, len(kept) + 1 + len(frames)))
            assert text_of(frames) == expected("after")
        assert not errors_logged(server)
    finally:
        for process in (*servers, redis):
            process.stop()
