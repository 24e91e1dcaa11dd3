"""The broker contract fixtures: every backend, started the way the app starts it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatbot.broker import Broker, open_broker
from chatbot.settings import Settings

from ..support.procs import RedisClusterProcess, RedisProcess
from ..support.waiting import wait_until


async def ready(backend: Broker) -> bool:
    """What /readyz would say of `backend`."""
    return bool((await backend.check())["ok"])


class Controls:
    """Control messages an instance received, waitable."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def __call__(self, message: dict[str, Any]) -> None:
        self.messages.put_nowait(message)


SETTINGS = Settings(history_turns=2, session_log_max_events=1000, redis_canary_interval_s=0.2)


async def started(settings: Settings, instance: str = "instance-a") -> Broker:
    """A backend started as the app starts it, once its /readyz would say ok; the control
    messages it receives in `.controls`."""
    backend = open_broker(settings)
    controls = Controls()
    await backend.start(instance, controls)
    backend.controls = controls  # type: ignore[attr-defined]
    await wait_until(lambda: ready(backend), timeout_s=10)
    return backend


async def backend_settings(request: pytest.FixtureRequest, kind: str) -> Settings:
    """SETTINGS for the backend `kind` ("memory", "redis", "cluster"), its Redis emptied."""
    settings = SETTINGS
    if kind == "redis":
        server: RedisProcess = request.getfixturevalue("redis_server")
        settings = settings.replace(redis_url=server.url)
        import redis.asyncio as aioredis

        async with aioredis.from_url(server.url) as admin:
            await admin.flushall()
    elif kind == "cluster":
        cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
        settings = settings.replace(redis_url=cluster.url)
        cluster.flush()
    return settings


@pytest.fixture(params=["memory", "redis", "cluster"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    backend = await started(await backend_settings(request, request.param))
    yield backend
    await backend.close()
