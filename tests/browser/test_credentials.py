"""The page sends its credentials (ACCESS_TOKEN, the session id) as WebSocket subprotocols, in
real Chromium against a real private server: nothing secret in the URLs a balancer logs."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import pytest
from playwright.async_api import Page, expect

from chatbot.fake_openai import reply_text

from ..support.procs import ChatbotProcess, FakeOpenAIProcess
from .conftest import FAKE_CHUNKS
from .test_web_client import WAIT_MS, expect_reply, messages, open_chat, send, stored_session

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

# Characters a subprotocol cannot carry as they are (the page sends it base64url).
TOKEN = "a/private+shared=token~ä"


@pytest.fixture(scope="module")
def private_server(fake_openai: FakeOpenAIProcess) -> Iterator[ChatbotProcess]:
    env = {"OPENAI_BASE_URL": fake_openai.base_url, "REDIS_URL": "", "ACCESS_TOKEN": TOKEN}
    server = ChatbotProcess(env).start()
    yield server
    server.kill()


async def test_the_page_keeps_credentials_out_of_the_socket_url(
    page: Page, private_server: ChatbotProcess
) -> None:
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await open_chat(page, f"{private_server.url}/#token={quote(TOKEN, safe='')}")
    await send(page, "keep it private")
    await expect_reply(messages(page, "assistant"), reply_text("keep it private", FAKE_CHUNKS))
    session = (await stored_session(page) or {})["id"]
    await page.reload()
    await expect(messages(page)).to_have_count(2, timeout=WAIT_MS)
    assert (await stored_session(page) or {})["id"] == session  # resumed: the same session
    assert sockets == [private_server.ws_url, f"{private_server.ws_url}?after=0"]
