"""On a Redis Cluster, the leases of an instance killed mid-reply are claimed shard by shard:
with replies streaming in sessions on every master, each one ends `interrupted` for the
sockets watching it from another instance, in bounded time, and each session takes messages
again."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import pytest

from ..support.frames import Client
from ..support.procs import RedisClusterProcess
from .conftest import LEASE_S, Cluster, connect

pytestmark = pytest.mark.cluster

LONG = "[[fake:chunks=40]] [[fake:interval_ms=50]]"  # a reply of about 2 s


@pytest.mark.parametrize("live", ["redis+cluster"], indirect=True)
async def test_killing_an_instance_mid_reply_in_sessions_on_every_shard_ends_each_reply(
    live: Cluster,
) -> None:
    cluster = live.redis
    assert isinstance(cluster, RedisClusterProcess)
    one, two, _ = live.instances
    masters = {master.address for master in cluster.masters}
    async with AsyncExitStack() as stack:
        watchers: dict[str, Client] = {}  # by the master serving the session
        while set(watchers) != masters:
            watcher = await stack.enter_async_context(connect(one.ws_url))
            master = cluster.node_of_slot(cluster.slot_of(watcher.session))
            watchers.setdefault(master.address, watcher)
        for n, watcher in enumerate(watchers.values()):
            sender = await stack.enter_async_context(connect(two.ws_url, watcher.session))
            await sender.send({"type": "message", "id": f"doomed-{n}", "text": f"{n} {LONG}"})
        for watcher in watchers.values():
            await watcher.until(lambda f: f["type"] == "delta")
        two.kill()
        killed_at = time.monotonic()
        for n, watcher in enumerate(watchers.values()):
            frames = await watcher.until_done(timeout_s=LEASE_S * 3 + 5)
            assert (frames[-1]["reply_to"], frames[-1]["reason"]) == (f"doomed-{n}", "interrupted")
        # One lease TTL for the leases to lapse, a sweep interval to notice them.
        waited_s = time.monotonic() - killed_at
        assert waited_s <= LEASE_S + LEASE_S / 4 + 1.5, waited_s
        for watcher in watchers.values():
            await watcher.send({"type": "message", "text": "and now?"})
            assert (await watcher.until_done())[-1]["reason"] == "stop"
