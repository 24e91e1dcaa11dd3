"""The Redis Cluster backend on a real local cluster (3 masters, 3 replicas): what it promises
beyond the contract suite, which runs on it too (conftest.py).

Sessions here are picked so that every master serves some of them: each shard carries its own
sessions, leases and fan-out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from chatbot.broker import NEW_EPOCH, Broker, Event, Lease
from chatbot.chat.limits import AbuseLimits
from chatbot.errors import EpochChanged, RateLimited
from chatbot.fake_openai import FakeOpenAI, reply_text
from chatbot.protocol import delta_event, done_event, queued, user_event
from chatbot.settings import Settings

from ..conftest import Socket, seqs, text_of
from ..support.procs import RedisClusterNode, RedisClusterProcess
from ..support.waiting import wait_until
from .conftest import SETTINGS, started


def sessions_on_every_master(cluster: RedisClusterProcess, each: int) -> dict[str, list[str]]:
    """`each` session ids served by every master, by master address."""
    owner = {slot: master for master in cluster.masters for slot in master.view()[master.id].slots}
    found: dict[str, list[str]] = {master.address: [] for master in set(owner.values())}
    n = 0
    while any(len(ids) < each for ids in found.values()):
        session = f"session-{n}"
        ids = found[owner[cluster.slot_of(session)].address]
        if len(ids) < each:
            ids.append(session)
        n += 1
    return found


def master_of(cluster: RedisClusterProcess, session: str) -> RedisClusterNode:
    return cluster.node_of_slot(cluster.slot_of(session))


@pytest.fixture
async def settings(redis_cluster: RedisClusterProcess) -> Settings:
    redis_cluster.flush()
    return SETTINGS.replace(redis_url=redis_cluster.url)


@pytest.fixture
async def two(settings: Settings) -> AsyncIterator[tuple[Broker, Broker]]:
    """Two instances on the cluster, as two processes would be."""
    a = await started(settings, "instance-a")
    b = await started(settings, "instance-b")
    yield a, b
    await b.close()
    await a.close()


async def next_item(sub) -> Event | str:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(5):
        while True:
            item = await sub.get()
            if isinstance(item, Event | str):
                return item


async def test_every_key_and_channel_of_a_session_is_in_its_own_slot(
    redis_cluster: RedisClusterProcess, two: tuple[Broker, Broker]
) -> None:
    a, b = two
    session = "one-slot"
    await a.create_session(session)
    assert await a.acquire(session, Lease("instance-a", "m", "t"), 5)
    await a.add_turn(session, "user", "hi")
    async with b.subscribe(session):
        await a.append(session, user_event("m", "hi"))
        master = master_of(redis_cluster, session)
        keys = master.command("KEYS", f"chatbot:{{{session}}}:*")
        channels = master.command("PUBSUB", "SHARDCHANNELS", f"chatbot:{{{session}}}:*")
    assert sorted(key.rsplit(":", 1)[1] for key in keys) == ["hist", "lease", "log", "meta", "subs"]
    assert channels == [f"chatbot:{{{session}}}:e:instance-b"]
    slots = {master.command("CLUSTER", "KEYSLOT", name) for name in [*keys, *channels]}
    assert slots == {redis_cluster.slot_of(session)}


async def test_leases_orphaned_on_every_shard_are_claimed_by_a_live_instance(
    redis_cluster: RedisClusterProcess, settings: Settings
) -> None:
    """An instance dies mid-reply in sessions on every shard: its leases stop being renewed,
    and another instance's sweep claims each one (and only once) and closes the reply."""
    sessions = [s for ids in sessions_on_every_master(redis_cluster, 3).values() for s in ids]
    dying = await started(settings, "instance-dying")
    survivor = await started(settings, "instance-b")
    try:
        for session in sessions:
            await dying.create_session(session)
            assert await dying.acquire(session, Lease("instance-dying", f"m-{session}", "t"), 0.5)
            await dying.append(session, user_event(f"m-{session}", "hello"))
        await dying.close()  # no release, no renewal: as a killed process leaves them
        claimed: dict[str, Lease] = {}

        async def all_claimed() -> bool:
            for session, lease in await survivor.claim_expired("instance-b", 5):
                assert session not in claimed, "claimed twice"
                claimed[session] = lease
            return len(claimed) == len(sessions)

        await wait_until(all_claimed, timeout_s=10)
        assert await survivor.claim_expired("instance-c", 5) == []
        for session, lease in claimed.items():
            assert (lease.owner, lease.msg_id) == ("instance-b", f"m-{session}")
            assert await survivor.lease(session) == lease
            done = done_event(f"m-{session}", "interrupted")
            assert await survivor.finish(session, done, lease)
            logged = [(e.seq, e.data["type"]) for e in await survivor.replay(session, 0)]
            assert logged == [(1, "user"), (2, "done")]
            assert await survivor.lease(session) is None
    finally:
        await survivor.close()


async def test_events_reach_another_instance_in_sessions_on_every_shard(
    redis_cluster: RedisClusterProcess, two: tuple[Broker, Broker]
) -> None:
    writer, reader = two
    sessions = [s for ids in sessions_on_every_master(redis_cluster, 2).values() for s in ids]
    async with AsyncExitStack() as stack:
        local = {s: await stack.enter_async_context(writer.subscribe(s)) for s in sessions}
        remote = {s: await stack.enter_async_context(reader.subscribe(s)) for s in sessions}
        written = {}
        for session in sessions:
            await writer.create_session(session)
            written[session] = [
                (await writer.append(session, delta_event("m", f"{session} {n}"))).frame
                for n in range(5)
            ]
            await writer.announce(session, queued("m", 2))
        for session in sessions:
            for sub in (remote[session], local[session]):
                got = [await next_item(sub) for _ in range(6)]
                frames = [item.frame if isinstance(item, Event) else item for item in got]
                assert frames[:5] == written[session]
                assert frames[5] == '{"type":"queued","reply_to":"m","position":2}'
                assert [item.seq for item in got[:5]] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]


async def test_one_pubsub_connection_per_shard_whatever_the_sessions(
    redis_cluster: RedisClusterProcess, settings: Settings
) -> None:
    by_master = sessions_on_every_master(redis_cluster, 10)
    broker = await started(settings, "instance-a")
    try:
        async with AsyncExitStack() as stack:
            for ids in by_master.values():
                for session in ids:
                    await stack.enter_async_context(broker.subscribe(session))
                    await stack.enter_async_context(broker.subscribe(session))  # 2 sockets
            masters = redis_cluster.masters

            def subscribed_clients(master: RedisClusterNode) -> list[int]:
                """Sharded subscriptions of each client of `master` that has any."""
                listing = str(master.command("CLIENT", "LIST")).splitlines()
                fields = [dict(f.split("=", 1) for f in line.split()) for line in listing]
                return [int(f["ssub"]) for f in fields if int(f.get("ssub", 0))]

            async def one_each() -> bool:  # connections of brokers closed before may linger
                return all(len(subscribed_clients(master)) == 1 for master in masters)

            await wait_until(one_each, timeout_s=5)
            for master in masters:
                # Its sessions' channels, the canary of the shard, maybe the control channel.
                (count,) = subscribed_clients(master)
                assert count - len(by_master[master.address]) in (1, 2)
    finally:
        await broker.close()


async def test_rate_limits_count_in_the_cluster(settings: Settings) -> None:
    """Two instances share an address's message rate; its keys live in the cluster."""
    a, b = await started(settings, "instance-a"), await started(settings, "instance-b")
    try:
        tight = settings.replace(rate_limit_ip="3/minute")
        limits = [AbuseLimits(tight, a), AbuseLimits(tight, b)]
        for n in range(3):
            await limits[n % 2].check_message(None, "198.51.100.7")
        with pytest.raises(RateLimited) as refused:
            await limits[1].check_message(None, "198.51.100.7")
        assert 0 < refused.value.retry_after_s <= 60
        await limits[0].check_message(None, "198.51.100.8")  # another address is not limited
    finally:
        await b.close()
        await a.close()


async def test_the_app_streams_replies_on_a_cluster(
    app_with, settings: Settings, fake: FakeOpenAI
) -> None:
    """The whole app on the cluster: replies stream whole, seqs contiguous, and a session's
    fourth message over its rate is refused before reaching the model."""
    app_settings = settings.replace(
        openai_base_url=fake.base_url,
        openai_api_key="sk-test",
        openai_model="test-model",
        lease_ttl_s=2.0,
        rate_limit_session="3/minute",
    )
    async with app_with(app_settings) as app:
        async with app.test_client().websocket("/ws") as raw:
            ws = Socket(raw)
            assert (await ws.recv())["type"] == "ready"
            frames = []
            for n in range(3):
                await ws.send({"type": "message", "id": f"m{n}", "text": f"hello {n}"})
                reply = await ws.until_done()
                assert text_of(reply) == reply_text(f"hello {n}", 5)
                frames += reply
            assert seqs(frames) == list(range(1, len(frames) + 1))
            await ws.send({"type": "message", "id": "fourth", "text": "one too many"})
            refused = await ws.recv()
    assert (refused["type"], refused["code"]) == ("error", "rate_limited")
    assert len(fake.requests) == 3


def a_session_away_from_the_shared_keys(
    cluster: RedisClusterProcess,
) -> tuple[str, RedisClusterNode]:
    """A session on a master that does not hold the `{chatbot}` keys (the epoch survives it)."""
    shared = master_of(cluster, "chatbot")
    by_master = sessions_on_every_master(cluster, 1)
    address, (session,) = next((a, ids) for a, ids in by_master.items() if a != shared.address)
    return session, next(m for m in cluster.masters if m.address == address)


async def test_a_shard_that_comes_back_empty_begins_a_new_epoch(
    redis_cluster: RedisClusterProcess, two: tuple[Broker, Broker]
) -> None:
    """A shard loses its data (as a master restarted empty): the next instance to meet one of
    its sessions begins a new epoch, with a new secret, and every instance's sockets hear it;
    the session is gone, not started again at seq 1 under the old epoch."""
    a, b = two
    session, master = a_session_away_from_the_shared_keys(redis_cluster)
    await a.create_session(session)
    await a.append(session, user_event("m", "hello"))
    epoch, secret = a.epoch, await a.secret()
    async with a.subscribe(session) as sub:
        master.command("FLUSHALL")
        assert await b.last_seq(session) is None
        assert b.epoch != epoch
        await wait_until(lambda: _same_epoch(a, b))
        async with asyncio.timeout(5):
            while (item := await sub.get()) is not NEW_EPOCH:
                assert not isinstance(item, Event)
    assert await a.secret() != secret
    assert await a.last_seq(session) is None
    assert a.epoch == b.epoch  # and no further epoch: the slot is marked again


async def test_a_writer_finding_a_sessions_seq_gone_back_begins_a_new_epoch(
    redis_cluster: RedisClusterProcess, two: tuple[Broker, Broker]
) -> None:
    """A replica that had not synced the last appends took over: the writer's next append
    finds the seq lower than it wrote, writes nothing, and a new epoch begins."""
    a, b = two
    session = "going-back"
    await a.create_session(session)
    for n in range(3):
        await a.append(session, delta_event("m", f"{n}"))
    epoch = a.epoch
    master_of(redis_cluster, session).command("HSET", f"chatbot:{{{session}}}:meta", "seq", 1)
    with pytest.raises(EpochChanged):
        await a.append(session, delta_event("m", "3"))
    assert a.epoch != epoch
    await wait_until(lambda: _same_epoch(a, b))
    assert await b.last_seq(session) == 1  # nothing was written


async def _same_epoch(a: Broker, b: Broker) -> bool:
    return a.epoch == b.epoch


def test_a_cluster_url_names_its_seed_nodes_and_options() -> None:
    import ssl

    from chatbot.broker.redis_cluster import RedisClusterBroker

    url = "rediss+cluster://:secret@10.0.0.1:7000, [::1]:7001,redis.example.com?ssl_cert_reqs=none"
    broker = RedisClusterBroker(Settings(redis_url=url))  # no network: how it would connect
    nodes = broker._redis.nodes_manager.startup_nodes.values()  # type: ignore[attr-defined]
    assert sorted(node.name for node in nodes) == [
        "10.0.0.1:7000",
        "::1:7001",
        "redis.example.com:6379",
    ]
    connection = next(iter(nodes)).connection_class(**next(iter(nodes)).connection_kwargs)
    assert connection.ssl_context.cert_reqs == ssl.CERT_NONE
    assert connection.password == "secret"
    with pytest.raises(ValueError, match="database 0"):
        RedisClusterBroker(Settings(redis_url="redis+cluster://10.0.0.1:7000/2"))


async def test_the_shard_of_the_shared_keys_coming_back_empty_begins_a_new_epoch(
    redis_cluster: RedisClusterProcess, two: tuple[Broker, Broker]
) -> None:
    """Its epoch, secret and counters are gone: every instance finds out by itself within a
    canary interval, even one that writes nothing, as with one Redis."""
    a, b = two
    epoch, secret = a.epoch, await a.secret()
    assert b.epoch == epoch
    master_of(redis_cluster, "chatbot").command("FLUSHALL")
    await wait_until(lambda: _new_epochs(a, b, epoch))
    assert a.epoch == b.epoch
    assert await a.secret() == await b.secret() != secret


async def _new_epochs(a: Broker, b: Broker, old: str) -> bool:
    return old not in (a.epoch, b.epoch)


def test_a_slots_marker_costs_no_search_when_a_session_first_lands_in_it() -> None:
    """Each slot's marker is tagged with the first hex number in that slot, and naming the
    markers of thousands of slots takes no search each: a search per slot not seen before held
    the event loop ~10 ms per new session (73 % of an instance's CPU in bench.run's
    chatbot-pair-cluster at N=200, and seconds of p99 time to the first delta)."""
    from chatbot.broker.redis_cluster import _marker

    started = time.process_time()
    markers = [_marker(slot) for slot in range(REDIS_CLUSTER_HASH_SLOTS)]
    assert time.process_time() - started < 1.0
    for slot in range(0, REDIS_CLUSTER_HASH_SLOTS, 331):
        tag = markers[slot].split("{")[1].split("}")[0]
        assert key_slot(markers[slot].encode()) == slot
        assert all(key_slot(b"%x" % n) != slot for n in range(int(tag, 16)))


async def test_unknown_sessions_are_no_data_loss(two: tuple[Broker, Broker]) -> None:
    """Sessions never stored, in slots that hold others or in slots that never held any, read
    as unknown and begin no epoch; nor does a session being created while another instance
    looks one up in the same fresh slot."""
    a, b = two
    epoch = a.epoch
    for n in range(50):
        await a.create_session(f"stored-{n}")
    assert [await b.last_seq(f"never-{n}") for n in range(200)] == [None] * 200
    fresh = [f"fresh-{n}" for n in range(50)]
    await asyncio.gather(
        *(a.create_session(session) for session in fresh),
        *(b.last_seq(session) for session in fresh),
    )
    assert [await b.last_seq(session) for session in fresh] == [0] * 50
    assert a.epoch == b.epoch == epoch


async def test_appends_survive_a_shard_losing_its_scripts(
    redis_cluster: RedisClusterProcess, two: tuple[Broker, Broker]
) -> None:
    """A master that restarted (or a replica promoted) may not know the scripts: the calls it
    refuses did not run, so they are loaded on it and sent again, once each."""
    a, _ = two
    await a.create_session("flushed")
    assert (await a.append("flushed", delta_event("m", "a"))).seq == 1
    for master in redis_cluster.masters:
        master.command("SCRIPT", "FLUSH")
    async with asyncio.timeout(5):
        appended = await asyncio.gather(
            *(a.append("flushed", delta_event("m", "b")) for _ in range(3))
        )
    assert sorted(e.seq for e in appended) == [2, 3, 4]
    assert [e.seq for e in await a.replay("flushed", 0)] == [1, 2, 3, 4]
