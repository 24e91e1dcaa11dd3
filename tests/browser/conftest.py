"""Browser-test fixtures: real servers, Debian's Chromium via Playwright, a severable proxy.

One fake OpenAI server and one chatbot server (pointed at it) serve the whole folder; every test
gets a fresh browser context, so a fresh localStorage and a fresh chat session. Chromium runs
for the whole session, which is why every async fixture and test here uses the session's loop.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    Playwright,
    async_playwright,
    expect,
)

from ..support.procs import ChatbotProcess, FakeOpenAIProcess, require_executable
from .tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"

# Quick replies by default; a test that needs a long one says so with [[fake:...]] directives.
FAKE_TTFT_MS = 50
FAKE_CHUNKS = 8
FAKE_INTERVAL_MS = 30
MODEL = "test-model"
# Long enough to echo a 20,000-character formatted reply (the fake repeats the prompt).
MAX_MESSAGE_CHARS = 25_000

ACTION_TIMEOUT_MS = 10_000
WAIT_MS = 10_000  # for a reply of a few seconds at most, or a reconnect
LIST = "[data-testid=message-list]"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Runs in every page before the app: after each task that changed the DOM, note how each
# assistant message looks (state, typing indicator shown, text length), so a test can prove a
# reply streamed (typing indicator, then partial text, then done) without racing the stream.
RECORDER = """
(() => {
  const history = {};
  const statuses = [];
  window.__chat = { history, statuses };
  const snapshot = () => {
    const status = document.querySelector('[data-testid=status]')?.dataset.status;
    if (status && statuses.at(-1) !== status) statuses.push(status);
    for (const m of document.querySelectorAll('[data-testid=message][data-role=assistant]')) {
      const typing = m.querySelector('[data-testid=typing]');
      const body = m.querySelector('[data-testid=message-text]');
      const entry = {
        state: m.dataset.state,
        typing: Boolean(typing) && !typing.hidden,
        length: body ? body.textContent.length : 0,
      };
      const list = (history[m.dataset.id] ??= []);
      const last = list.at(-1);
      if (!last || last.state !== entry.state || last.typing !== entry.typing
          || last.length !== entry.length) list.push(entry);
    }
  };
  new MutationObserver(snapshot).observe(document, {
    subtree: true, childList: true, characterData: true, attributes: true,
  });
})();
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAIProcess]:
    fake = FakeOpenAIProcess(
        "--ttft-ms",
        str(FAKE_TTFT_MS),
        "--chunks",
        str(FAKE_CHUNKS),
        "--interval-ms",
        str(FAKE_INTERVAL_MS),
    ).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def chat_server(fake_openai: FakeOpenAIProcess) -> Iterator[ChatbotProcess]:
    server = ChatbotProcess(
        {
            "OPENAI_BASE_URL": fake_openai.base_url,
            "OPENAI_API_KEY": "",
            "OPENAI_MODEL": MODEL,
            "REDIS_URL": "",  # the in-memory broker, whatever the developer's shell says
            "MAX_MESSAGE_CHARS": str(MAX_MESSAGE_CHARS),
            "WS_MAX_MESSAGE_BYTES": str(12 * MAX_MESSAGE_CHARS + 256),
            # One server and one address for the whole browser suite: the per-address limits
            # are tested elsewhere, and must not depend here on how fast the machine runs it.
            "RATE_LIMIT_IP": "100000/minute",
            "RATE_LIMIT_HANDSHAKES_IP": "100000/minute",
            "RATE_LIMIT_NEW_SESSIONS": "100000/minute",
        }
    ).start()
    yield server
    # Not a graceful stop: with websocket pings on, Hypercorn keeps each closed socket until
    # its ping loop next wakes (up to 20 s), so SIGTERM would wait out the 5 s graceful timeout.
    server.kill()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def playwright() -> AsyncIterator[Playwright]:
    async with async_playwright() as pw:
        yield pw


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser(playwright: Playwright) -> AsyncIterator[Browser]:
    chromium = require_executable("chromium", package="chromium")
    async with asyncio.timeout(30):
        browser = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
    yield browser
    async with asyncio.timeout(30):
        await browser.close()


class PageErrors:
    """Uncaught exceptions in the page, and anything its CSP blocked, fail the test that caused
    them: the page must never even try to run or load what model output smuggles in."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page: Page) -> Page:
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        page.on("console", lambda message: self._console(page, message))
        return page

    def _console(self, page: Page, message: ConsoleMessage) -> None:
        # A CSP or Trusted Types violation (the latter's message names no policy).
        if message.type == "error" and re.search(r"Content Security Policy|Trusted", message.text):
            self.errors.append(f"{page.url}: {message.text}")


@pytest.fixture
def page_errors() -> Iterator[PageErrors]:
    watcher = PageErrors()
    yield watcher
    assert not watcher.errors, "uncaught errors in the page:\n" + "\n".join(watcher.errors)


@pytest_asyncio.fixture(loop_scope="session")
async def context(browser: Browser, page_errors: PageErrors) -> AsyncIterator[BrowserContext]:
    """A fresh profile (own localStorage) at a desktop size."""
    async with asyncio.timeout(30):
        context = await browser.new_context(viewport={"width": 1000, "height": 700})
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    await context.add_init_script(RECORDER)
    context.on("page", page_errors.watch)
    yield context
    async with asyncio.timeout(30):
        await context.close()


@pytest_asyncio.fixture(loop_scope="session")
async def page(context: BrowserContext) -> Page:
    return await context.new_page()


@pytest_asyncio.fixture(loop_scope="session")
async def proxy(chat_server: ChatbotProcess) -> AsyncIterator[TcpProxy]:
    """The chat server behind a proxy the test can sever."""
    async with TcpProxy(chat_server.port) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def fake_control(fake_openai: FakeOpenAIProcess) -> AsyncIterator[httpx.AsyncClient]:
    """HTTP client for the fake's `/_fake/...` control endpoints."""
    base = f"http://127.0.0.1:{fake_openai.port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        yield client


async def fake_request_for(
    control: httpx.AsyncClient, prompt: str, *, ended: bool, timeout_s: float = 10.0
) -> dict[str, Any]:
    """The fake's record of the (last) chat request whose last user message is `prompt`.

    With `ended`, waits (long poll, no sleeping) until that request is no longer streaming.
    """
    records = (await control.get("/_fake/requests")).raise_for_status().json()
    numbers = [
        n
        for n, record in enumerate(records, start=1)
        if record["messages"] and record["messages"][-1].get("content") == prompt
    ]
    assert numbers, f"the fake saw no request for {prompt!r}"
    query = {"wait": "ended" if ended else "exists", "timeout_s": timeout_s}
    reply = await control.get(f"/_fake/requests/{numbers[-1]}", params=query, timeout=timeout_s + 5)
    return reply.raise_for_status().json()  # type: ignore[no-any-return]


# Page helpers shared by the browser tests.


def messages(page: Page, role: str | None = None) -> Locator:
    selector = f"{LIST} [data-testid=message]"
    return page.locator(selector if role is None else f"{selector}[data-role={role}]")


def text_of(message: Locator) -> Locator:
    return message.get_by_test_id("message-text")


async def open_chat(page: Page, url: str) -> None:
    await page.goto(url)
    await expect(page.get_by_test_id("status")).to_have_attribute(
        "data-status", "connected", timeout=WAIT_MS
    )


async def send(page: Page, text: str) -> None:
    composer = page.get_by_test_id("composer")
    await composer.fill(text)
    await composer.press("Enter")
    await expect(composer).to_have_value("", timeout=WAIT_MS)


def words(text: str) -> list[str]:
    return text.split()


async def expect_reply(message: Locator, expected: str) -> None:
    """The reply finishes and shows `expected` (rendered as Markdown, so compared word by word:
    a paragraph drops its trailing space): nothing lost, nothing repeated."""
    await expect(message).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    await expect(text_of(message)).to_have_text(expected, timeout=WAIT_MS)  # whitespace-blind
    assert words(await text_of(message).text_content() or "") == words(expected)
