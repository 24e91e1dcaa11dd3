"""The runtime: one typed way from the app and its routes to the running `ChatService`, which
owns the broker and the model it opens and closes them with itself."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from quart import Quart

from chatbot.app import create_app
from chatbot.broker.memory import MemoryBroker
from chatbot.chat.service import ChatService
from chatbot.llm.demo import DemoProvider
from chatbot.llm.resilient import ResilientModel
from chatbot.runtime import runtime_of
from chatbot.settings import Settings

from .conftest import Socket, text_of
from .support.procs import RedisProcess
from .support.waiting import wait_until


async def test_closing_the_service_closes_its_broker_and_model() -> None:
    service = await ChatService.open(Settings())  # the in-process broker, the demo model
    broker, model = service.broker, service.model
    assert isinstance(broker, MemoryBroker) and isinstance(model, ResilientModel)
    assert isinstance(model.provider, DemoProvider)
    assert not broker.closed and not model.provider.closed
    await service.close()
    assert broker.closed and model.provider.closed


async def test_closing_the_service_lets_go_of_its_redis_connections() -> None:
    server = RedisProcess().start()
    try:
        async with aioredis.from_url(server.url) as admin:

            async def connected() -> bool:
                return len(await admin.client_list()) > 1  # more than this one

            async def disconnected() -> bool:
                return len(await admin.client_list()) == 1

            assert await disconnected()
            service = await ChatService.open(Settings(redis_url=server.url))
            await service.open_session(None)
            await wait_until(connected)
            await service.close()
            await wait_until(disconnected)
    finally:
        server.stop()


async def test_the_app_serves_with_one_service_and_closes_it_at_shutdown() -> None:
    app = create_app(Settings(demo_word_delay_s=0))
    runtime = runtime_of(app)
    with pytest.raises(RuntimeError, match="only while the app serves"):
        runtime.service  # noqa: B018 - the property raises
    async with app.test_app() as test_app:
        service = runtime.service
        async with test_app.test_client().websocket("/ws") as raw:
            ws = Socket(raw)
            await ws.recv()  # ready
            await ws.send({"type": "message", "text": "hello"})
            assert "hello" in text_of(await ws.until_done())
        assert runtime.service is service
    assert isinstance(service.broker, MemoryBroker) and service.broker.closed
    assert isinstance(service.model, ResilientModel)
    assert isinstance(service.model.provider, DemoProvider) and service.model.provider.closed
    with pytest.raises(RuntimeError):
        runtime.service  # noqa: B018


def test_only_apps_from_create_app_have_a_runtime() -> None:
    with pytest.raises(LookupError, match="create_app"):
        runtime_of(Quart(__name__))
