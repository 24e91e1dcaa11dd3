"""A real cluster: Redis (one redis-server, or a Redis Cluster of six), the fake OpenAI server,
three chatbot instances, HAProxy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ..support.frames import Client, connect, seqs, text_of
from ..support.procs import (
    ChatbotProcess,
    FakeOpenAIProcess,
    HAProxyProcess,
    RedisClusterProcess,
    RedisProcess,
)
from ..support.waiting import wait_until

LEASE_S = 2.0
RECEIVE_TIMEOUT_S = 10.0

pytestmark = pytest.mark.cluster

__all__ = ["Client", "connect", "seqs", "text_of"]

# The Redis deployments the instances can share: `@ON_EVERY_REDIS` runs a test on each.
REDIS_KINDS = ("redis", "redis+cluster")
ON_EVERY_REDIS = pytest.mark.parametrize("live", REDIS_KINDS, indirect=True)


def instance_env(redis_url: str, fake_url: str, lease_s: float = LEASE_S) -> dict[str, str]:
    """What an instance of a multi-instance test runs with: short leases, canaries and Redis
    timeouts, so that faults show within seconds."""
    return {
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": fake_url,
        "OPENAI_API_KEY": "sk-cluster-test",
        "GENERATION_LEASE_S": str(lease_s),
        "REDIS_CANARY_INTERVAL_S": "0.5",
        "REDIS_TIMEOUT_S": "1",
    }


class Cluster:
    def __init__(self, redis_kind: str = "redis") -> None:
        self.redis: RedisProcess | RedisClusterProcess
        if redis_kind == "redis+cluster":
            self.redis = RedisClusterProcess().start()
        else:
            self.redis = RedisProcess(durable=True).start()
        self.fake = FakeOpenAIProcess("--ttft-ms", "50", "--chunks", "5", "--interval-ms", "20")
        self.fake.start()
        env = instance_env(self.redis.url, self.fake.base_url) | {"SHUTDOWN_GRACE_S": "10"}
        self.instances = [ChatbotProcess(env, name=f"chatbot-{n}") for n in (1, 2, 3)]
        for instance in self.instances:
            instance.start()
        self.lb = HAProxyProcess([i.port for i in self.instances]).start()

    def by_server(self, name: str) -> ChatbotProcess:
        """The instance HAProxy calls `name` (app1, app2, app3)."""
        return self.instances[int(name.removeprefix("app")) - 1]

    def revive(self) -> None:
        for instance in self.instances:
            if instance.proc is None or instance.proc.poll() is not None:
                instance.start()
        if isinstance(self.redis, RedisClusterProcess):
            for node in self.redis.nodes:
                if not node.running:
                    self.redis.restart(node)
        elif self.redis.proc is None or self.redis.proc.poll() is not None:
            self.redis.start()

    async def all_ready(self, timeout_s: float = 20.0) -> None:
        """Every instance says ready and HAProxy routes to each (its health checks passed)."""
        state: dict[str, Any] = {}
        async with httpx.AsyncClient(timeout=2) as client:

            async def ready() -> bool:
                try:
                    state["instances"] = [
                        (await client.get(i.url + "/readyz")).json() for i in self.instances
                    ]
                    state["routed"] = {
                        (await client.get(self.lb.url + "/healthz")).headers.get("x-chatbot-server")
                        for _ in range(12)
                    }
                except (httpx.HTTPError, ValueError) as exc:
                    state["error"] = repr(exc)
                    return False
                statuses = [body["status"] for body in state["instances"]]
                return statuses == ["ready"] * 3 and state["routed"] == {"app1", "app2", "app3"}

            try:
                await wait_until(ready, timeout_s)
            except TimeoutError:
                raise AssertionError(f"cluster not ready: {state}") from None

    def stop(self) -> None:
        for process in (self.lb, *self.instances, self.fake, self.redis):
            process.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def sharded_cluster() -> Iterator[Cluster]:
    """The instances on a Redis Cluster (three masters, three replicas)."""
    cluster = Cluster("redis+cluster")
    yield cluster
    cluster.stop()


@pytest.fixture
async def live(request: pytest.FixtureRequest) -> Cluster:
    """The cluster (on one Redis, or on the Redis `@ON_EVERY_REDIS` names), with anything a
    previous test killed started again, all routed to."""
    kind = getattr(request, "param", "redis")
    cluster: Cluster = request.getfixturevalue("sharded_cluster" if kind != "redis" else "cluster")
    cluster.revive()
    await cluster.all_ready()
    async with httpx.AsyncClient() as client:
        await client.post(
            f"http://127.0.0.1:{cluster.fake.port}/_fake/config", json={"reset": True}
        )
    return cluster
