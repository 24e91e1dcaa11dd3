"""The local Redis Cluster the tests run the product on (`RedisClusterProcess`): it comes up
whole and serves a cluster client, a replica takes over a killed master, slots move with their
keys, and nothing is left running afterwards."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from chatbot.patches.redis import ask_on_one_connection

from ..support.procs import RedisClusterProcess

pytestmark = pytest.mark.cluster

KEYS = [f"key-{n}" for n in range(60)]


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterProcess]:
    cluster = RedisClusterProcess().start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def client(redis_cluster: RedisClusterProcess) -> AsyncIterator[RedisCluster]:
    nodes = [ClusterNode("127.0.0.1", node.port) for node in redis_cluster.nodes]
    client = RedisCluster(startup_nodes=nodes, decode_responses=True)
    async with asyncio.timeout(10):
        await client.initialize()
    yield client
    await client.aclose()


def test_a_cluster_comes_up_whole_and_leaves_nothing_running() -> None:
    cluster = RedisClusterProcess().start()
    try:
        assert cluster.url.startswith("redis+cluster://127.0.0.1:")
        assert cluster.url.count(",") == 5
        masters, replicas = cluster.masters, cluster.replicas
        assert len(masters) == 3 and len(replicas) == 3
        for master in masters:
            assert len(cluster.replicas_of(master)) == 1
        for node in cluster.nodes:
            info = node.info()
            assert info["cluster_state"] == "ok"
            assert info["cluster_slots_assigned"] == info["cluster_slots_ok"] == "16384"
        pids = cluster.pids
        assert len(pids) == 6
    finally:
        cluster.stop()
    assert cluster.pids == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"redis-server {pid} is still there"
    for node in cluster.nodes:
        assert not os.path.exists(node.dir)


async def test_a_cluster_client_writes_and_reads_across_every_shard(
    redis_cluster: RedisClusterProcess, client: RedisCluster
) -> None:
    for key in KEYS:
        await client.set(key, f"value of {key}")
    assert [await client.get(key) for key in KEYS] == [f"value of {key}" for key in KEYS]
    shards = {redis_cluster.node_of_slot(redis_cluster.slot_of(key)).port for key in KEYS}
    assert shards == {master.port for master in redis_cluster.masters}
    # The slot the fixture computes is the one the server uses, {tags} included.
    for key in ("plain", "chatbot:s:{abc}:log", "{abc}"):
        assert redis_cluster.nodes[0].command("CLUSTER", "KEYSLOT", key) == (
            redis_cluster.slot_of(key)
        )
    assert redis_cluster.slot_of("chatbot:s:{abc}:log") == redis_cluster.slot_of("abc")


async def test_a_killed_master_is_replaced_by_its_replica_with_its_data(
    redis_cluster: RedisClusterProcess, client: RedisCluster
) -> None:
    key = "survives-failover"
    await client.set(key, "kept")
    master = redis_cluster.node_of_slot(redis_cluster.slot_of(key))
    assert await client.execute_command("WAIT", 1, 2000, target_nodes=client.get_node_from_key(key))
    [replica] = redis_cluster.replicas_of(master)
    redis_cluster.kill_master(master)
    successor = await asyncio.to_thread(redis_cluster.wait_failover)
    assert successor is replica
    assert redis_cluster.node_of_slot(redis_cluster.slot_of(key)) is replica
    async with asyncio.timeout(10):
        assert await client.get(key) == "kept"
    # Started again, the old master rejoins as its successor's replica.
    await asyncio.to_thread(redis_cluster.restart, master)
    assert redis_cluster.replicas_of(successor) == [master]
    assert master not in redis_cluster.masters


async def test_slots_move_to_another_master_with_their_keys(
    redis_cluster: RedisClusterProcess, client: RedisCluster
) -> None:
    tagged = [f"chatbot:s:{{moving}}:{n}" for n in range(5)]
    for key in tagged:
        await client.set(key, key.upper())
    slot = redis_cluster.slot_of("moving")
    source = redis_cluster.node_of_slot(slot)
    target = next(m for m in redis_cluster.masters if m is not source)
    half_moved: list[int] = []

    def between_calls() -> None:
        half_moved.append(int(source.command("CLUSTER", "COUNTKEYSINSLOT", slot)))

    await asyncio.to_thread(
        redis_cluster.migrate_slots, [slot], target, keys_per_call=2, after_each_call=between_calls
    )
    assert half_moved == [3, 1, 0]
    assert redis_cluster.node_of_slot(slot) is target
    assert target.command("CLUSTER", "COUNTKEYSINSLOT", slot) == 5
    async with asyncio.timeout(10):
        assert [await client.get(key) for key in tagged] == [key.upper() for key in tagged]


async def test_a_key_already_moved_is_read_through_ask_with_many_pooled_connections(
    redis_cluster: RedisClusterProcess, client: RedisCluster
) -> None:
    """While its slot moves, a key already on the new master is read there (ASK): redis-py
    sends `ASKING` and the command on one connection (chatbot/patches/redis.py). Unpatched, they
    went on two, and with an even number of free connections to that master the read failed
    with "TTL exhausted"."""
    ask_on_one_connection()
    slot = redis_cluster.slot_of("asked")
    source = redis_cluster.node_of_slot(slot)
    target = next(m for m in redis_cluster.masters if m is not source)
    keys = ["{asked}:a", "{asked}:b"]
    for key in keys:
        await client.set(key, key.upper())
    elsewhere = (f"k{n}" for n in range(10_000))
    other = next(
        k for k in elsewhere if redis_cluster.node_of_slot(redis_cluster.slot_of(k)) is target
    )
    # Ten connections to the target: ASKING and the command, each on the next free one, never
    # meet on one with an even number (with an odd one, they do after a few rounds).
    await asyncio.gather(*(client.get(other) for _ in range(10)))
    loop = asyncio.get_running_loop()
    reads: list[list[str | None]] = []

    async def read() -> list[str | None]:
        async with asyncio.timeout(5):
            return [await client.get(key) for key in keys]

    def read_half_moved() -> None:
        reads.append(asyncio.run_coroutine_threadsafe(read(), loop).result())

    await asyncio.to_thread(
        redis_cluster.migrate_slots,
        [slot],
        target,
        keys_per_call=1,
        after_each_call=read_half_moved,
    )
    assert reads == [[key.upper() for key in keys]] * 2
