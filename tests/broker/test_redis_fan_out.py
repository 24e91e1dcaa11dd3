"""Redis fan-out between instances: each event reaches every socket of its session once, in order,
on whichever instance it is; the writer's own sockets get it without a round trip through pub/sub,
and Redis publishes it only to the other instances that have sockets on the session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from chatbot.broker import Broker, Event, open_broker
from chatbot.protocol import delta_event, done_event, queued
from chatbot.settings import Settings

from ..support.procs import RedisProcess
from ..support.waiting import wait_until
from .conftest import ready
from .test_contract import next_event


@asynccontextmanager
async def instances(server: RedisProcess, *names: str) -> AsyncIterator[list[Broker]]:
    async with aioredis.from_url(server.url) as admin:
        await admin.flushall()
    settings = Settings(redis_url=server.url, redis_canary_interval_s=0.2)
    brokers = [open_broker(settings) for _ in names]
    try:
        for name, broker in zip(names, brokers, strict=True):
            await broker.start(name, lambda message: None)
            await wait_until(lambda b=broker: ready(b))
        yield brokers
    finally:
        for broker in brokers:
            await broker.close()


async def _members(server: RedisProcess, session: str) -> set[str]:
    async with aioredis.from_url(server.url, decode_responses=True) as admin:
        return set(await admin.smembers(f"chatbot:s:{session}:subs"))


async def next_item(sub: Any) -> Any:
    async with asyncio.timeout(5):
        return await sub.get()


async def test_events_reach_sockets_on_every_instance_once_and_in_order(
    redis_server: RedisProcess,
) -> None:
    async with instances(redis_server, "inst-a", "inst-b") as (a, b):
        await a.create_session("s")
        async with a.subscribe("s") as on_a, b.subscribe("s") as on_b:
            assert await _members(redis_server, "s") == {"inst-a", "inst-b"}
            written = [await a.append("s", delta_event("m", f"w{i}")) for i in range(3)]
            await a.announce("s", queued("m", 2))
            # An event another instance writes (the orphan sweep's `done`) reaches a's socket.
            written.append(await b.append("s", done_event("m", "interrupted")))
            for sub in (on_a, on_b):
                got = [await next_item(sub) for _ in range(5)]
                events = [item for item in got if isinstance(item, Event)]
                assert [e.frame for e in events] == [e.frame for e in written]
                assert [item for item in got if isinstance(item, str)] == [
                    '{"type":"queued","reply_to":"m","position":2}'
                ]
        await wait_until(lambda: _no_members(redis_server, "s"))


async def _no_members(server: RedisProcess, session: str) -> bool:
    return not await _members(server, session)


async def test_an_instance_leaves_a_session_when_its_last_subscriber_ends_by_an_error(
    redis_server: RedisProcess,
) -> None:
    async with instances(redis_server, "inst-a") as (a,):
        await a.create_session("s")
        with pytest.raises(LookupError):
            async with a.subscribe("s"), a.subscribe("s"):
                assert await _members(redis_server, "s") == {"inst-a"}
                raise LookupError
        await wait_until(lambda: _no_members(redis_server, "s"))


async def test_a_session_only_the_writer_serves_costs_no_pub_sub_traffic(
    redis_server: RedisProcess,
) -> None:
    async with aioredis.from_url(redis_server.url, decode_responses=True) as spy:
        watch = spy.pubsub()
        await watch.psubscribe("chatbot:e:*")
        async with instances(redis_server, "inst-a", "inst-b") as (a, b):
            await a.create_session("s")
            async with a.subscribe("s") as on_a:
                await a.append("s", delta_event("m", "local"))
                assert isinstance(await next_item(on_a), Event)
                async with b.subscribe("s") as on_b:
                    shared = await a.append("s", delta_event("m", "shared"))
                    assert (await next_event(on_b)).frame == shared.frame
            published = []
            while (message := await watch.get_message(timeout=0.2)) is not None:
                if message["type"] == "pmessage":
                    published.append((message["channel"], message["data"]))
        await watch.aclose()
    assert published == [("chatbot:e:inst-b", f"s {shared.frame}")]


async def test_instances_join_their_sessions_again_after_a_redis_restart() -> None:
    server = RedisProcess().start()
    try:
        async with instances(server, "inst-a", "inst-b") as (a, b):
            await a.create_session("s")
            async with b.subscribe("s") as on_b:
                server.restart()  # keeps nothing: the `subs` set is gone with the rest
                await wait_until(lambda: _members_are(server, "s", {"inst-b"}), timeout_s=15)
                await wait_until(lambda: ready(a), timeout_s=15)
                await a.create_session("s")
                after = await a.append("s", delta_event("m", "after the restart"))
                while (item := await next_item(on_b)) != after:
                    assert not isinstance(item, Event) or item.seq < after.seq
    finally:
        server.stop()


async def _members_are(server: RedisProcess, session: str, expected: set[str]) -> bool:
    try:
        return await _members(server, session) == expected
    except (aioredis.ConnectionError, OSError):
        return False
