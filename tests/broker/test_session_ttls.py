"""A session's lifetime on every backend, and on Redis its keys' TTLs: every key of a session has
one from the moment a script makes it (but the cluster's lease, which no eviction policy may
take), and an event refreshes them about once a second, not every time (redis.py,
`_append_one`). Read on the redis-server that holds the session's keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from chatbot.broker import Broker, Lease
from chatbot.errors import SessionExpired
from chatbot.protocol import delta_event, done_event, user_event

from ..support.procs import RedisClusterProcess, RedisProcess
from ..support.waiting import wait_until
from .conftest import backend_settings, started

SESSION = "ttl-session"


@dataclass(frozen=True)
class Stored:
    """The redis-server that holds a session's keys, and the pattern of their names."""

    port: int
    pattern: str

    def command(self, *args: Any) -> Any:
        with redis.Redis(port=self.port, decode_responses=True, socket_timeout=5) as client:
            return client.execute_command(*args)

    def ttls_ms(self) -> dict[str, int]:
        """Each key of the session, by its last part ("meta", "log"...): its PTTL (-1: none)."""
        keys = self.command("KEYS", self.pattern)
        return {key.rsplit(":", 1)[1]: int(self.command("PTTL", key)) for key in keys}

    def calls(self, command: str) -> int:
        """How many times Redis ran `command` (the scripts' commands included) since RESETSTAT."""
        stats = self.command("INFO", "commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def stored(request: pytest.FixtureRequest, kind: str, session: str) -> Stored | None:
    """Where `session`'s keys are on the backend `kind` (None for the memory backend)."""
    if kind == "redis":
        server: RedisProcess = request.getfixturevalue("redis_server")
        return Stored(server.port, f"chatbot:s:{session}:*")
    if kind == "cluster":
        cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
        master = cluster.node_of_slot(cluster.slot_of(session))
        return Stored(master.port, f"chatbot:{{{session}}}:*")
    return None


@pytest.fixture
async def short_lived(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """A backend (the test's `kind`) whose sessions live `ttl_s` (the test's) after activity."""
    kind, ttl_s = request.node.callspec.params["kind"], request.node.callspec.params["ttl_s"]
    backend = await started((await backend_settings(request, kind)).replace(session_ttl_s=ttl_s))
    yield backend
    await backend.close()


TTL_S = 60
LATE_MS = 2000  # how long a check may come after the call it checks, on a loaded machine


def assert_ttls(where: Stored, names: set[str]) -> None:
    """The session's keys are `names`, each with a TTL at most SESSION_TTL_S and at least what
    is left a second after a refresh."""
    ttls = where.ttls_ms()
    assert set(ttls) == names
    for name, ttl_ms in ttls.items():
        assert (TTL_S - 1) * 1000 - LATE_MS < ttl_ms <= TTL_S * 1000, (name, ttl_ms)


@pytest.mark.parametrize(("kind", "ttl_s"), [("redis", TTL_S), ("cluster", TTL_S)])
async def test_every_key_of_a_session_has_a_ttl_from_the_moment_it_is_made(
    request: pytest.FixtureRequest, short_lived: Broker, kind: str, ttl_s: int
) -> None:
    """Each step follows the last within a second, so the append's refresh is skipped: the
    keys made meanwhile (by the first event, a join, a history turn) get their TTLs anyway."""
    where = stored(request, kind, SESSION)
    assert where is not None
    async with asyncio.timeout(30):
        await short_lived.create_session(SESSION)
        assert_ttls(where, {"meta"})
        await short_lived.append(SESSION, user_event("m", "hi"))  # XADD makes the log
        assert_ttls(where, {"meta", "log"})
        async with short_lived.subscribe(SESSION):  # joins: the instance in `subs`
            assert_ttls(where, {"meta", "log", "subs"})
            await short_lived.add_turn(SESSION, "user", "hi", "t:user")
            assert_ttls(where, {"meta", "log", "subs", "hist"})
            for n in range(200):  # a burst: the refresh is skipped for most of it
                await short_lived.append(SESSION, delta_event("m", f"{n}"))
                if n % 50 == 0:
                    assert_ttls(where, {"meta", "log", "subs", "hist"})
            lease = Lease("instance-a", "m", "t")
            assert await short_lived.acquire(SESSION, lease, 5)
            assert await short_lived.finish(SESSION, done_event("m", "stop"), lease)
            assert_ttls(where, {"meta", "log", "subs", "hist"})
            # A log gone while the meta hash lives on (a repeated create refreshes the meta
            # alone) is made again by the next event, with its TTL.
            where.command("DEL", where.pattern.replace("*", "log"))
            await short_lived.create_session(SESSION)
            await short_lived.append(SESSION, delta_event("m", "again"))
            assert_ttls(where, {"meta", "log", "subs", "hist"})


@pytest.mark.parametrize(("kind", "ttl_s"), [("redis", TTL_S), ("cluster", TTL_S)])
async def test_a_burst_of_events_refreshes_the_ttls_about_once_a_second(
    request: pytest.FixtureRequest, short_lived: Broker, kind: str, ttl_s: int
) -> None:
    """Counted by Redis: 4 EXPIREs per event before (800 here); now 4 per second at most."""
    where = stored(request, kind, SESSION)
    assert where is not None
    events = 200
    async with asyncio.timeout(30):
        await short_lived.create_session(SESSION)
        await short_lived.append(SESSION, user_event("m", "hi"))  # the log made, TTLs set
        where.command("CONFIG", "RESETSTAT")
        began = time.monotonic()
        for n in range(events):
            await short_lived.append(SESSION, delta_event("m", f"{n}"))
        took_s = time.monotonic() - began
    expires = where.calls("expire")
    assert where.calls("xadd") == events
    assert expires <= 4 * (int(took_s) + 1), (expires, took_s)
    assert expires % 4 == 0  # the four keys together


@pytest.mark.parametrize(("kind", "ttl_s"), [("memory", 3), ("redis", 3), ("cluster", 3)])
async def test_a_session_kept_active_outlives_its_ttl_and_expires_a_ttl_after_its_last_event(
    request: pytest.FixtureRequest, short_lived: Broker, kind: str, ttl_s: int
) -> None:
    where = stored(request, kind, SESSION)
    async with asyncio.timeout(30):
        await short_lived.create_session(SESSION)
        for n in range(10):  # an event every 0.5 s for 5 s: well past the TTL
            if n:
                await asyncio.sleep(0.5)
            sent = time.monotonic()
            await short_lived.append(SESSION, delta_event("m", f"{n}"))
        assert await short_lived.last_seq(SESSION) == 10
        used = time.monotonic()  # (reading a memory session touches it: its last use)
        if where is not None:  # alive SESSION_TTL_S - 1 s after its last event (here 1 s less)
            await asyncio.sleep(sent + ttl_s - 2 - time.monotonic())
            assert set(where.ttls_ms()) == {"meta", "log"}
        await asyncio.sleep(used + ttl_s + 1.2 - time.monotonic())  # letting the TTL pass
        assert await short_lived.last_seq(SESSION) is None
        if where is not None:
            assert where.ttls_ms() == {}


@pytest.mark.parametrize(("kind", "ttl_s"), [("cluster", 3)])
async def test_an_append_to_a_session_expired_a_second_early_is_session_expired_not_a_new_epoch(
    request: pytest.FixtureRequest, short_lived: Broker, kind: str, ttl_s: int
) -> None:
    """The cluster's writer guards an append with the seq it last wrote there, while the session
    may still live. Its last event skipped the refresh, so the session expired up to a second
    before SESSION_TTL_S had passed: its seq is gone because the session is, not because the
    shard went back to older data."""
    where = stored(request, kind, SESSION)
    assert where is not None
    async with asyncio.timeout(30):
        await short_lived.create_session(SESSION)
        await short_lived.append(SESSION, user_event("m", "hi"))  # refreshes the TTLs
        await asyncio.sleep(0.6)
        await short_lived.append(SESSION, delta_event("m", "a"))  # skips the refresh
        last = time.monotonic()

        async def expired() -> bool:
            return where.ttls_ms() == {}

        await wait_until(expired, timeout_s=10)
        assert time.monotonic() < last + ttl_s  # before SESSION_TTL_S after its last event
        epoch = short_lived.epoch
        with pytest.raises(SessionExpired):
            await short_lived.append(SESSION, delta_event("m", "b"))
        assert short_lived.epoch == epoch
