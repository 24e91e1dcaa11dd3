"""ACCESS_TOKEN guards the chat endpoints of a private deployment; the page stays reachable."""

from __future__ import annotations

import pytest
from quart.testing.connections import WebsocketResponseError

from chatbot.errors import SettingsError
from chatbot.settings import Settings

from .conftest import Socket

TOKEN = "a-long-and-random-shared-secret"


@pytest.fixture
async def private(app_with, settings):
    async with app_with(settings.replace(access_token=TOKEN)) as app:
        yield app


async def test_sockets_need_the_token(private) -> None:
    client = private.test_client()
    for query in ({}, {"token": "wrong-token-of-enough-length"}):
        with pytest.raises(WebsocketResponseError) as refused:
            async with client.websocket("/ws", query_string=query):
                pass
        assert refused.value.response.status_code == 401
    async with client.websocket("/ws", query_string={"token": TOKEN}) as raw:
        assert (await Socket(raw).recv())["type"] == "ready"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with client.websocket("/ws", headers=headers) as raw:
        assert (await Socket(raw).recv())["type"] == "ready"


async def test_http_chat_endpoints_need_the_token_and_the_page_does_not(private) -> None:
    client = private.test_client()
    refused = await client.post("/chat", json={"message": "hi"})
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert set(await refused.get_json()) == {"error"}
    assert (await client.post("/api/ask", json={"message": "hi"})).status_code == 401
    assert (await client.get("/api/tasks/x")).status_code == 401
    allowed = await client.post(
        "/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert allowed.status_code == 200
    for path in ("/", "/healthz", "/readyz"):
        assert (await client.get(path)).status_code == 200


def test_a_short_token_is_refused_at_start_up() -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"ACCESS_TOKEN": "short"})
    assert error.value.variable == "ACCESS_TOKEN"
    assert "short" not in str(error.value) or "16" in str(error.value)
