"""The JavaScript `/ws` client snippet of docs/migrating.md (examples/clients/chat_client.js), run
in Chromium against the real server: it chats, and resumes through dropped connections with
nothing lost or doubled."""

from __future__ import annotations

import pytest
from playwright.async_api import Page

from ..support.frames import reply_over
from ..support.procs import ROOT, ChatbotProcess
from .tcp_proxy import TcpProxy

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

SNIPPET = (ROOT / "examples" / "clients" / "chat_client.js").read_text()
WAIT_MS = 20_000

# The snippet as a page would include it, plus a recorder of what its callbacks saw.
HARNESS = (
    SNIPPET.replace("export function openChat", "function openChat")
    + """
window.__snippet = { deltas: [], done: [], errors: [], statuses: [] };
window.__chat = openChat({
  onDelta: (text) => window.__snippet.deltas.push(text),
  onDone: (reason, replyTo) => window.__snippet.done.push(reason),
  onError: (code) => window.__snippet.errors.push(code),
  onStatus: (status, detail) => window.__snippet.statuses.push([status, detail]),
});
"""
)


async def open_snippet(page: Page, base_url: str) -> None:
    await page.goto(base_url + "/healthz")  # any page of the server's origin
    await page.add_script_tag(content=HARNESS, type="module")
    await page.wait_for_function("window.__chat && window.__chat.session", timeout=WAIT_MS)


async def logged_reply(server: ChatbotProcess, session: str) -> str:
    reply, same = await reply_over(server.ws_url, session=session, after=0)
    assert same == session
    return reply


async def test_the_js_snippet_streams_a_reply(page: Page, chat_server: ChatbotProcess) -> None:
    await open_snippet(page, chat_server.url)
    await page.evaluate("window.__chat.send('hello from the snippet')")
    await page.wait_for_function("window.__snippet.done.length === 1", timeout=WAIT_MS)
    seen = await page.evaluate("window.__snippet")
    assert seen["done"] == ["stop"] and seen["errors"] == []
    session = await page.evaluate("window.__chat.session")
    assert "".join(seen["deltas"]) == await logged_reply(chat_server, session)


async def test_the_js_snippet_resumes_through_dropped_connections(
    page: Page, proxy: TcpProxy, chat_server: ChatbotProcess
) -> None:
    await open_snippet(page, proxy.url)
    await page.evaluate(
        "window.__chat.send('[[fake:chunks=60]] [[fake:interval_ms=40]] a long one, please')"
    )
    for pieces in (3, 20):  # cut every connection twice, mid-reply
        await page.wait_for_function(f"window.__snippet.deltas.length >= {pieces}", timeout=WAIT_MS)
        assert proxy.sever() >= 1
    await page.wait_for_function("window.__snippet.done.length === 1", timeout=WAIT_MS)
    seen = await page.evaluate("window.__snippet")
    assert [s for s in seen["statuses"] if s[0] == "reconnecting"], seen["statuses"]
    session = await page.evaluate("window.__chat.session")
    assert "".join(seen["deltas"]) == await logged_reply(chat_server, session)
    assert seen["done"] == ["stop"]
