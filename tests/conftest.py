"""Shared fixtures: a real fake-OpenAI HTTP server and the real app, served in-process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from quart import Quart

from chatbot.app import create_app
from chatbot.fake_openai import FakeOpenAI
from chatbot.settings import Settings

from .support.frames import FrameReader, seqs, text_of
from .support.procs import RedisClusterProcess, RedisProcess

__all__ = ["Socket", "ready_sockets", "seqs", "text_of"]

RECEIVE_TIMEOUT_S = 5.0
API_KEY = "sk-test-secret-key-that-must-never-leak"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    """A real OpenAI-compatible HTTP server; quick replies of 5 chunks unless a test says."""
    async with FakeOpenAI(ttft_ms=0, chunks=5, interval_ms=5) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """One throwaway redis-server for the test run; tests flush what they need."""
    server = RedisProcess().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcess]:
    """One throwaway Redis Cluster (3 masters, 3 replicas) for the test run; tests flush what
    they need."""
    cluster = RedisClusterProcess().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
async def settings(request: pytest.FixtureRequest, fake: FakeOpenAI) -> Settings:
    """App settings against the fake upstream, once per broker backend: memory, one Redis,
    a Redis Cluster (the session's, every master flushed)."""
    base = Settings(
        openai_base_url=fake.base_url,
        openai_api_key=API_KEY,
        openai_model="test-model",
        lease_ttl_s=2.0,
    )
    if request.param == "memory":
        return base
    return base.replace(redis_url=await _flushed(request, request.param))


@pytest.fixture(params=["redis", "cluster"])
async def redis_url(request: pytest.FixtureRequest) -> str:
    """REDIS_URL of an empty shared Redis: one server, then a Redis Cluster (the session's)."""
    return await _flushed(request, request.param)


async def _flushed(request: pytest.FixtureRequest, kind: str) -> str:
    if kind == "cluster":
        cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
        cluster.flush()
        return cluster.url
    server: RedisProcess = request.getfixturevalue("redis_server")
    async with aioredis.from_url(server.url) as admin:
        await admin.flushall()
    return server.url


AppFactory = Callable[..., Any]


@pytest.fixture
def app_with() -> Callable[..., Any]:
    """`async with app_with(settings) as test_app:` runs the app's start-up and shutdown."""

    @asynccontextmanager
    async def run(settings: Settings) -> AsyncIterator[Quart]:
        app = create_app(settings)
        async with app.test_app() as test_app:
            yield test_app  # type: ignore[misc]

    return run


@pytest.fixture
async def app(app_with: AppFactory, settings: Settings) -> AsyncIterator[Quart]:
    async with app_with(settings) as test_app:
        yield test_app


class Socket(FrameReader):
    """A test-client WebSocket with receive timeouts and JSON helpers."""

    timeout_s = RECEIVE_TIMEOUT_S

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    async def _receive(self) -> str | bytes:
        return await self.raw.receive()  # type: ignore[no-any-return]

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.raw.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))


@asynccontextmanager
async def ready_sockets(app: Quart, n: int) -> AsyncIterator[list[Socket]]:
    """`n` sockets on `app`, each on a new session and past its `ready` frame."""
    async with AsyncExitStack() as stack:
        client = app.test_client()
        sockets = [
            Socket(await stack.enter_async_context(client.websocket("/ws"))) for _ in range(n)
        ]
        for ws in sockets:
            assert (await ws.recv())["type"] == "ready"
        yield sockets


@pytest.fixture
def connect(app: Quart) -> Callable[..., Any]:
    """`async with connect(session=..., after=...) as (ws, ready):` a socket that got `ready`."""

    @asynccontextmanager
    async def open_socket(
        session: str | None = None, after: int | None = None, headers: dict[str, str] | None = None
    ) -> AsyncIterator[tuple[Socket, dict[str, Any]]]:
        query = {k: v for k, v in (("session", session), ("after", after)) if v is not None}
        client = app.test_client()
        async with client.websocket("/ws", query_string=query, headers=headers) as raw:
            ws = Socket(raw)
            ready = await ws.recv()
            assert ready["type"] == "ready"
            yield ws, ready

    return open_socket
