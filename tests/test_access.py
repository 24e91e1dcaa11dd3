"""ACCESS_TOKEN guards the chat endpoints of a private deployment; the page stays reachable."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
import websockets
from quart.testing.connections import WebsocketResponseError
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from chatbot.errors import SettingsError
from chatbot.settings import Settings

from .conftest import Socket
from .support.procs import ChatbotProcess

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


# A token with characters a subprotocol cannot carry as they are: the page sends it base64url.
ODD_TOKEN = "a/long+shared=secret with~odd chars"


def subprotocols(token: str | None = None, session: str | None = None) -> list[Subprotocol]:
    offered = ["chatbot.v1"]
    if session:
        offered.append(f"chatbot.session.{session}")
    if token:
        encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
        offered.append(f"chatbot.token.{encoded}")
    return [Subprotocol(p) for p in offered]


@pytest.fixture(scope="module")
def private_server() -> Iterator[ChatbotProcess]:
    chatbot = ChatbotProcess({"ACCESS_TOKEN": ODD_TOKEN, "DEMO_WORD_DELAY_S": "0"}).start()
    yield chatbot
    chatbot.stop()


async def test_credentials_travel_as_subprotocols_not_in_the_url(
    private_server: ChatbotProcess,
) -> None:
    """Against the real server (Hypercorn answers the subprotocol): the token and the session
    id in `Sec-WebSocket-Protocol`, nothing in the URL that access logs record."""
    url = private_server.ws_url
    async with asyncio.timeout(10):
        async with websockets.connect(url, subprotocols=subprotocols(ODD_TOKEN)) as ws:
            assert ws.subprotocol == "chatbot.v1"
            session = json.loads(await ws.recv())["session"]
            await ws.send(json.dumps({"type": "message", "text": "remember me"}))
            while json.loads(await ws.recv())["type"] != "done":
                pass
        resumed = subprotocols(ODD_TOKEN, session)
        async with websockets.connect(url + "?after=0", subprotocols=resumed) as ws:
            replay = [json.loads(await ws.recv()) for _ in range(2)]
            while json.loads(await ws.recv())["type"] != "done":  # read all: the close is last
                pass
    assert (replay[0]["session"], replay[1]["text"]) == (session, "remember me")
    for offered, status in [
        (subprotocols("wrong-token-of-enough-length", session), 401),
        (subprotocols(), 401),
        ([Subprotocol("graphql-ws")], 400),  # offered, but not ours: said, not a silent 1006
    ]:
        with pytest.raises(InvalidStatus) as refused:
            async with asyncio.timeout(10):
                await websockets.connect(url, subprotocols=offered)
        assert refused.value.response.status_code == status
        if status == 400:
            assert b"chatbot.v1" in refused.value.response.body


async def test_the_query_string_form_still_works(private_server: ChatbotProcess) -> None:
    query = urlencode({"token": ODD_TOKEN})
    async with asyncio.timeout(10), websockets.connect(f"{private_server.ws_url}?{query}") as ws:
        assert ws.subprotocol is None
        assert json.loads(await ws.recv())["type"] == "ready"
