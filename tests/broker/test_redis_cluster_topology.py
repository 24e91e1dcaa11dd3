"""The Redis Cluster backend while the cluster changes under it: a master killed and its replica
promoted, a live session's slot moved to another master. Each test has a cluster of its own (it
breaks it); two brokers play two instances, one writing, one with a socket on the session.

What a socket must see either way: every event once, in order (a RESYNC re-reads the log for
what was published while its channel moved), and the broker ready again afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from chatbot.broker import RESYNC, Broker, Event, Subscription
from chatbot.errors import BrokerUnavailable
from chatbot.protocol import delta_event

from ..support.procs import RedisClusterProcess
from ..support.waiting import wait_until
from .conftest import SETTINGS, ready, started


@pytest.fixture
def cluster() -> Iterator[RedisClusterProcess]:
    cluster = RedisClusterProcess().start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def two(cluster: RedisClusterProcess) -> AsyncIterator[tuple[Broker, Broker]]:
    settings = SETTINGS.replace(redis_url=cluster.url, redis_timeout_s=2.0)
    writer, reader = await started(settings, "writer"), await started(settings, "reader")
    yield writer, reader
    await reader.close()
    await writer.close()


async def append_riding_out(broker: Broker, session: str, text: str, key: str) -> Event:
    """Append as a reply does: retried while the broker is unavailable (a failover), with a key
    so that a retry of an append that ran adds nothing."""
    async with asyncio.timeout(20):
        while True:
            try:
                return await broker.append(session, delta_event("m", text), key=key)
            except BrokerUnavailable:
                await asyncio.sleep(0.1)


async def texts_until(sub: Subscription, broker: Broker, session: str, last: int) -> list[str]:
    """What a feed shows its socket up to seq `last`: live events, and on RESYNC (or a gap) the
    log from the last seq seen. Each event once, in order."""
    seen: list[str] = []
    async with asyncio.timeout(20):
        while len(seen) < last:
            item = await sub.get()
            if item is RESYNC or (isinstance(item, Event) and item.seq > len(seen) + 1):
                seen += [e.data["text"] for e in await broker.replay(session, len(seen))]
            elif isinstance(item, Event) and item.seq == len(seen) + 1:
                seen.append(item.data["text"])
    return seen


async def test_a_master_killed_mid_reply_its_replica_takes_over_and_no_event_is_lost(
    cluster: RedisClusterProcess, two: tuple[Broker, Broker]
) -> None:
    writer, reader = two
    session = "failing-over"
    await writer.create_session(session)
    async with reader.subscribe(session) as sub:
        for n in range(5):
            await writer.append(session, delta_event("m", f"{n}"), key=f"k{n}")
        master = cluster.node_of_slot(cluster.slot_of(session))
        cluster.kill_master(master)

        async def shard_down() -> bool:
            shards = (await reader.check())["shards"]
            return not shards.get(master.address, {}).get("listening")

        # The shard is down for every instance alike: the others serve on, and it stays ready.
        await wait_until(shard_down, timeout_s=10)
        assert (await reader.check())["ok"]
        for n in range(5, 10):  # while its replica takes over
            await append_riding_out(writer, session, f"{n}", f"k{n}")
        successor = cluster.wait_failover()
        for n in range(10, 15):
            await append_riding_out(writer, session, f"{n}", f"k{n}")
        texts = await texts_until(sub, reader, session, 15)
        channels = successor.command("PUBSUB", "SHARDCHANNELS", f"chatbot:{{{session}}}:*")
    assert texts == [str(n) for n in range(15)]
    assert channels == [f"chatbot:{{{session}}}:e:reader"]
    assert reader.stats().reconnects >= 1
    await wait_until(lambda: ready(reader), timeout_s=20)
    await wait_until(lambda: ready(writer), timeout_s=20)


async def test_a_live_sessions_slot_moved_to_another_master_keeps_its_sockets_fed(
    cluster: RedisClusterProcess, two: tuple[Broker, Broker]
) -> None:
    writer, reader = two
    session = "moving"
    await writer.create_session(session)
    slot = cluster.slot_of(session)
    source = cluster.node_of_slot(slot)
    target = next(master for master in cluster.masters if master is not source)
    async with reader.subscribe(session) as sub:
        for n in range(5):
            await writer.append(session, delta_event("m", f"{n}"), key=f"k{n}")
        await asyncio.to_thread(cluster.migrate_slots, [slot], target)
        for n in range(5, 10):
            await append_riding_out(writer, session, f"{n}", f"k{n}")
        texts = await texts_until(sub, reader, session, 10)
        assert cluster.node_of_slot(slot) is target
        channels = target.command("PUBSUB", "SHARDCHANNELS", f"chatbot:{{{session}}}:*")
    assert texts == [str(n) for n in range(10)]
    assert channels == [f"chatbot:{{{session}}}:e:reader"]  # it listens where the slot went
    await wait_until(lambda: ready(reader), timeout_s=10)


async def test_a_slot_moved_while_a_reply_streams_into_it(
    cluster: RedisClusterProcess, two: tuple[Broker, Broker]
) -> None:
    """The writer keeps appending while the slot's keys move (ASK, TRYAGAIN on the way): every
    append lands once, in order."""
    writer, reader = two
    session = "moving-while-writing"
    await writer.create_session(session)
    slot = cluster.slot_of(session)
    source = cluster.node_of_slot(slot)
    target = next(master for master in cluster.masters if master is not source)

    async def reply() -> None:
        for n in range(40):
            await append_riding_out(writer, session, f"{n}", f"k{n}")
            await asyncio.sleep(0.01)

    async with reader.subscribe(session) as sub:
        writing = asyncio.ensure_future(reply())
        await asyncio.to_thread(cluster.migrate_slots, [slot], target, keys_per_call=1)
        await writing
        texts = await texts_until(sub, reader, session, 40)
    assert texts == [str(n) for n in range(40)]
    assert [e.seq for e in await reader.replay(session, 0)] == list(range(1, 41))
