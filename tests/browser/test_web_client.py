"""The browser client (`web/`) in real headless Chromium against the real server and fake OpenAI."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.async_api import BrowserContext, Page, expect

from chatbot.fake_openai import reply_text

from ..support.procs import ChatbotProcess
from .conftest import (
    ARTIFACTS,
    FAKE_CHUNKS,
    LIST,
    MODEL,
    WAIT_MS,
    expect_reply,
    fake_request_for,
    messages,
    open_chat,
    send,
    text_of,
)
from .tcp_proxy import TcpProxy

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]


async def stored_session(page: Page) -> dict[str, object] | None:
    return await page.evaluate("JSON.parse(localStorage.getItem('chatbot.session'))")  # type: ignore[no-any-return]


async def reply_history(page: Page, msg_id: str) -> list[dict[str, object]]:
    return await page.evaluate("(id) => window.__chat.history[id] ?? []", msg_id)  # type: ignore[no-any-return]


async def test_sends_with_the_keyboard_and_streams_the_reply(
    page: Page, chat_server: ChatbotProcess
) -> None:
    await open_chat(page, chat_server.url)
    await expect(page.get_by_test_id("model")).to_have_text(MODEL)
    await expect(page.get_by_test_id("demo-label")).to_be_hidden()

    composer = page.get_by_test_id("composer")
    await composer.focus()
    await page.keyboard.type("first line")
    await page.keyboard.press("Shift+Enter")  # a new line, not a send
    await page.keyboard.type("second line")
    await expect(messages(page)).to_have_count(0)
    await page.keyboard.press("Enter")
    prompt = "first line\nsecond line"

    user = messages(page, "user")
    await expect(user).to_have_count(1, timeout=WAIT_MS)
    assert await text_of(user).text_content() == prompt
    await expect(composer).to_have_value("")
    reply = messages(page, "assistant")
    await expect_reply(reply, reply_text(prompt, FAKE_CHUNKS))
    await expect(user).to_have_attribute("data-state", "done")

    # It streamed: the typing indicator before any text, then partial text, then done.
    history = await reply_history(page, await reply.get_attribute("data-id") or "")
    full = len(reply_text(prompt, FAKE_CHUNKS))
    assert history[0] == {"state": "streaming", "typing": True, "length": 0}, history
    assert any(h["state"] == "streaming" and 0 < h["length"] < full for h in history), history
    assert history[-1] == {"state": "done", "typing": False, "length": full}, history
    await expect(reply.get_by_test_id("typing")).to_be_hidden()
    await expect(page.get_by_test_id("send")).to_be_visible()


async def test_stop_ends_the_reply_and_aborts_the_upstream_request(
    page: Page, chat_server: ChatbotProcess, fake_control: httpx.AsyncClient
) -> None:
    await open_chat(page, chat_server.url)
    prompt = "[[fake:chunks=200]] [[fake:interval_ms=50]] a long story, please"
    await send(page, prompt)
    reply = messages(page, "assistant")
    await expect(text_of(reply)).to_contain_text("word3", timeout=WAIT_MS)
    await expect(reply).to_have_attribute("data-state", "streaming")
    # While a reply streams: Stop instead of Send, and Enter does not send.
    send_button, stop = page.get_by_test_id("send"), page.get_by_test_id("stop")
    await expect(send_button).to_be_hidden()
    await page.get_by_test_id("composer").fill("not now")
    await page.get_by_test_id("composer").press("Enter")
    await expect(messages(page, "user")).to_have_count(1)

    await stop.click()
    await expect(reply).to_have_attribute("data-reason", "cancelled", timeout=WAIT_MS)
    await expect(reply).to_have_attribute("data-state", "done")
    await expect(reply.get_by_test_id("message-note")).to_have_text("Stopped")
    await expect(stop).to_be_hidden()
    await expect(send_button).to_be_enabled()  # "not now" is still in the composer
    shown = await text_of(reply).text_content() or ""
    whole = reply_text("a long story, please", 200)
    assert whole.startswith(shown) and len(shown) < len(whole)

    record = await fake_request_for(fake_control, prompt, ended=True)
    assert record["status"] == "aborted", record


XSS = (
    '<script>window.__xss=1</script> <img src=x onerror="window.__xss=1"> '
    "[click](javascript:window.__xss=1)"
)


async def test_model_output_with_markup_renders_as_text(
    page: Page, chat_server: ChatbotProcess
) -> None:
    await open_chat(page, chat_server.url)
    await send(page, XSS)
    reply = messages(page, "assistant")
    await expect_reply(reply, reply_text(XSS, FAKE_CHUNKS))  # the model echoed the payload
    assert await text_of(messages(page, "user")).text_content() == XSS
    assert await page.evaluate("typeof window.__xss") == "undefined"
    await expect(page.locator(f"{LIST} script, {LIST} img, {LIST} a, {LIST} iframe")).to_have_count(
        0
    )


async def test_reload_restores_the_conversation(page: Page, chat_server: ChatbotProcess) -> None:
    await open_chat(page, chat_server.url)
    await send(page, "remember me")
    await expect_reply(messages(page, "assistant"), reply_text("remember me", FAKE_CHUNKS))
    session = await stored_session(page)
    assert session is not None

    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.reload()
    await expect(page.get_by_test_id("status")).to_have_attribute(
        "data-status", "connected", timeout=WAIT_MS
    )
    await expect(messages(page)).to_have_count(2, timeout=WAIT_MS)
    assert await text_of(messages(page, "user")).text_content() == "remember me"
    await expect_reply(messages(page, "assistant"), reply_text("remember me", FAKE_CHUNKS))
    # The session id travels as a subprotocol, not in the URL that access logs record.
    assert sockets == [f"{chat_server.ws_url}?after=0"]
    assert (await stored_session(page) or {})["id"] == session["id"]


async def test_drop_mid_reply_reconnects_and_resumes_exactly(page: Page, proxy: TcpProxy) -> None:
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await open_chat(page, proxy.url)
    prompt = "[[fake:chunks=40]] [[fake:interval_ms=60]] keep going"
    await send(page, prompt)
    reply = messages(page, "assistant")
    await expect(text_of(reply)).to_contain_text("word4", timeout=WAIT_MS)

    proxy.refuse()  # hold the outage until the page has shown it
    assert proxy.sever() > 0
    status = page.get_by_test_id("status")
    await expect(status).to_have_attribute("data-status", "reconnecting", timeout=WAIT_MS)
    await expect(reply).to_have_attribute("data-state", "streaming")
    proxy.accept()
    await expect(status).to_have_attribute("data-status", "connected", timeout=WAIT_MS)

    await expect_reply(reply, reply_text("keep going", 40))
    assert len(sockets) >= 2
    resumed = parse_qs(urlsplit(sockets[-1]).query)
    # The session id travels as a subprotocol; the URL holds the resume point only.
    assert sockets[-1].startswith(f"ws://127.0.0.1:{proxy.port}/ws?after=")
    assert int(resumed["after"][0]) > 2  # the user event and some deltas had been seen
    assert len(resumed["epoch"][0]) >= 16  # the epoch its seqs count in, from `ready`
    assert await page.evaluate("window.__chat.statuses") == [
        "connecting",
        "connected",
        "reconnecting",
        "connected",
    ]


async def test_two_tabs_on_one_session_stay_in_sync(
    context: BrowserContext, chat_server: ChatbotProcess
) -> None:
    first = await context.new_page()
    await open_chat(first, chat_server.url)
    second = await context.new_page()  # same profile: it continues the stored session
    await open_chat(second, chat_server.url)

    await send(first, "from the first tab")
    expected = reply_text("from the first tab", FAKE_CHUNKS)
    for tab in (first, second):
        await expect(text_of(messages(tab, "user"))).to_have_text(
            ["from the first tab"], timeout=WAIT_MS
        )
        await expect_reply(messages(tab, "assistant"), expected)

    await send(second, "and from the second")
    expected = reply_text("and from the second", FAKE_CHUNKS)
    for tab in (first, second):
        await expect(messages(tab, "user")).to_have_count(2, timeout=WAIT_MS)
        await expect(text_of(messages(tab, "user").nth(1))).to_have_text("and from the second")
        await expect_reply(messages(tab, "assistant").nth(1), expected)


async def test_new_chat_clears_the_list_and_starts_a_new_session(
    page: Page, chat_server: ChatbotProcess
) -> None:
    await open_chat(page, chat_server.url)
    await send(page, "old conversation")
    await expect_reply(messages(page, "assistant"), reply_text("old conversation", FAKE_CHUNKS))
    old = (await stored_session(page) or {})["id"]

    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.get_by_test_id("new-chat").click()
    await expect(messages(page)).to_have_count(0)
    await expect(page.get_by_test_id("status")).to_have_attribute(
        "data-status", "connected", timeout=WAIT_MS
    )
    await page.wait_for_function(
        "(old) => JSON.parse(localStorage.getItem('chatbot.session'))?.id !== old",
        arg=old,
        timeout=WAIT_MS,
    )
    new = (await stored_session(page) or {})["id"]
    assert new and new != old
    assert sockets == [chat_server.ws_url]  # no session asked for: the server makes one

    await send(page, "new conversation")
    await expect_reply(messages(page, "assistant"), reply_text("new conversation", FAKE_CHUNKS))
    await page.reload()
    await expect(text_of(messages(page, "user"))).to_have_text(
        ["new conversation"], timeout=WAIT_MS
    )


async def test_demo_mode_is_labelled(page: Page) -> None:
    server = ChatbotProcess(
        {"OPENAI_BASE_URL": "", "OPENAI_API_KEY": "", "REDIS_URL": "", "DEMO_WORD_DELAY_S": "0.01"},
        name="chatbot-demo",
    )
    await asyncio.to_thread(server.start)
    try:
        await open_chat(page, server.url)
        label = page.get_by_test_id("demo-label")
        await expect(label).to_be_visible()
        await expect(label).to_have_text("Demo mode — offline canned replies")
        await expect(page.get_by_test_id("model")).to_have_text("demo")
        await send(page, "hello demo")
        reply = messages(page, "assistant")
        await expect(reply).to_have_attribute("data-state", "done", timeout=WAIT_MS)
        await expect(text_of(reply)).to_contain_text("You said: “hello demo”")
    finally:
        server.kill()  # see `chat_server`: a graceful stop waits out hypercorn's ping loop


async def test_an_expired_session_starts_fresh(page: Page, chat_server: ChatbotProcess) -> None:
    await page.goto(chat_server.url + "/healthz")  # same origin, so the same localStorage
    await page.evaluate(
        "localStorage.setItem('chatbot.session', JSON.stringify({id: 'gone', lastSeq: 7}))"
    )
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await open_chat(page, chat_server.url)
    assert sockets == [f"{chat_server.ws_url}?after=0"]  # the session id: a subprotocol
    await expect(page.get_by_test_id("notice")).to_contain_text("expired")
    session = await stored_session(page) or {}
    assert session["id"] != "gone" and session["lastSeq"] == 0
    await send(page, "a fresh start")
    await expect_reply(messages(page, "assistant"), reply_text("a fresh start", FAKE_CHUNKS))


async def test_upstream_error_shows_an_error_state_and_retry_sends_again(
    page: Page, chat_server: ChatbotProcess
) -> None:
    await open_chat(page, chat_server.url)
    prompt = "[[fake:status=500]] this will fail"
    await send(page, prompt)
    reply = messages(page, "assistant")
    # The SDK retries 5xx twice with backoff before the reply fails: allow for it.
    await expect(reply).to_have_attribute("data-state", "error", timeout=WAIT_MS)
    error = reply.get_by_test_id("error-text")
    await expect(error).to_be_visible()
    await expect(error).to_have_text("The model service failed (HTTP 500). Try again.")
    retry = reply.get_by_test_id("retry")
    await expect(retry).to_be_enabled()

    await retry.click()
    users = messages(page, "user")
    await expect(users).to_have_count(2, timeout=WAIT_MS)
    await expect(text_of(users.nth(1))).to_have_text(prompt)
    ids = [await u.get_attribute("data-id") for u in await users.all()]
    assert ids[0] != ids[1]  # a new message, not the old one again
    await expect(messages(page, "assistant").nth(1)).to_have_attribute(
        "data-state", "error", timeout=WAIT_MS
    )


async def test_code_blocks_copy_and_screenshot(
    context: BrowserContext, page: Page, chat_server: ChatbotProcess
) -> None:
    await context.grant_permissions(["clipboard-read", "clipboard-write"])
    await open_chat(page, chat_server.url)
    await send(page, "What does `greet` print?")
    await expect(messages(page, "assistant")).to_have_attribute(
        "data-state", "done", timeout=WAIT_MS
    )
    code = 'def greet(name):\n    return f"Hello, {name}!"'
    await send(page, f"Show me a Python example:\n```python\n{code}\n```")
    reply = messages(page, "assistant").nth(1)
    await expect(reply).to_have_attribute("data-state", "done", timeout=WAIT_MS)

    await expect(messages(page, "assistant").first.locator("code.inline-code")).to_have_text(
        "greet"
    )
    block = reply.locator(".code-block")
    await expect(block.locator("pre > code")).to_have_text(code)
    assert await block.locator("pre > code").text_content() == code
    await expect(block.locator(".code-lang")).to_have_text("python")
    await block.get_by_test_id("copy").click()
    await expect(block.get_by_test_id("copy")).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == code

    await page.get_by_test_id("composer").focus()
    await expect(block.get_by_test_id("copy")).to_have_text("Copy", timeout=WAIT_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "conversation.png")


async def test_fits_a_phone_screen(context: BrowserContext, chat_server: ChatbotProcess) -> None:
    page = await context.new_page()
    await page.set_viewport_size({"width": 360, "height": 640})
    await open_chat(page, chat_server.url)
    long_word = "x" * 300
    await send(page, f"{long_word} and `some_rather_long_inline_code_identifier()`")
    await expect(messages(page, "assistant")).to_have_attribute(
        "data-state", "done", timeout=WAIT_MS
    )
    assert await page.evaluate("document.documentElement.scrollWidth") <= 360
    for testid in ("composer", "send", "new-chat", "status"):
        await expect(page.get_by_test_id(testid)).to_be_in_viewport()

    # Keyboard only: Tab order is header, conversation, composer, send.
    await page.get_by_test_id("composer").fill("a draft")
    await page.get_by_test_id("new-chat").focus()
    order = []
    for _ in range(3):
        await page.keyboard.press("Tab")
        order.append(await page.evaluate("document.activeElement.dataset.testid"))
    assert order == ["message-list", "composer", "send"]  # send is enabled: text was typed
