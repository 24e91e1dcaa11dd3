"""A real cluster: redis-server, the fake OpenAI server, three chatbot instances, HAProxy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import websockets

from ..support.frames import FrameReader, seqs, text_of
from ..support.procs import ChatbotProcess, FakeOpenAIProcess, HAProxyProcess, RedisProcess
from ..support.waiting import wait_until

LEASE_S = 2.0
RECEIVE_TIMEOUT_S = 10.0

pytestmark = pytest.mark.cluster

__all__ = ["Client", "connect", "seqs", "text_of"]


class Cluster:
    def __init__(self) -> None:
        self.redis = RedisProcess(durable=True).start()
        self.fake = FakeOpenAIProcess("--ttft-ms", "50", "--chunks", "5", "--interval-ms", "20")
        self.fake.start()
        env = {
            "REDIS_URL": self.redis.url,
            "OPENAI_BASE_URL": self.fake.base_url,
            "OPENAI_API_KEY": "sk-cluster-test",
            "GENERATION_LEASE_S": str(LEASE_S),
            "REDIS_CANARY_INTERVAL_S": "0.5",
            "REDIS_TIMEOUT_S": "1",
            "SHUTDOWN_GRACE_S": "10",
        }
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
        if self.redis.proc is None or self.redis.proc.poll() is not None:
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


@pytest.fixture
async def live(cluster: Cluster) -> Cluster:
    """The cluster, with anything a previous test killed started again, all routed to."""
    cluster.revive()
    await cluster.all_ready()
    async with httpx.AsyncClient() as client:
        await client.post(
            f"http://127.0.0.1:{cluster.fake.port}/_fake/config", json={"reset": True}
        )
    return cluster


class Client(FrameReader):
    """A real WebSocket client (the `websockets` library) with receive timeouts."""

    timeout_s = RECEIVE_TIMEOUT_S

    def __init__(self, ws: Any, ready: dict[str, Any]) -> None:
        self.ws = ws
        self.ready = ready
        self.session: str = ready["session"]
        self.server: str | None = ws.response.headers.get("X-Chatbot-Server")

    async def _receive(self) -> str | bytes:
        return await self.ws.recv()  # type: ignore[no-any-return]

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))


@asynccontextmanager
async def connect(
    url: str, session: str | None = None, after: int | None = None
) -> AsyncIterator[Client]:
    query = "&".join(
        f"{k}={v}" for k, v in (("session", session), ("after", after)) if v is not None
    )
    async with asyncio.timeout(RECEIVE_TIMEOUT_S):
        ws = await websockets.connect(f"{url}?{query}" if query else url, open_timeout=5)
    try:
        async with asyncio.timeout(RECEIVE_TIMEOUT_S):
            ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        yield Client(ws, ready)
    finally:
        async with asyncio.timeout(5):
            await ws.close()
