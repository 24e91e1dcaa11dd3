"""Replies rendered as Markdown, in real Chromium against the real server and the fake model.

The fake echoes the prompt (`You said: {prompt}`), in pieces of `split` characters, so each test
writes the reply a model would send and watches the page render it as it streams.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Locator, Page, expect

from bench.render import long_reply
from chatbot.fake_openai import reply_text

from ..support.procs import ChatbotProcess
from .conftest import (
    ARTIFACTS,
    WAIT_MS,
    messages,
    open_chat,
    send,
    text_of,
)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

CODE = 'def greet(name):\n    return f"Hello, {name}!"'
SAMPLE = f"""Here is a plan for the **release**, with *two* checks:

1. Run the tests with `pytest -q`
2. Update the [changelog](https://example.com/changelog)
3. Tag the release

| Step | Owner | Time |
|:-----|:-----:|-----:|
| Tests | CI | 5 min |
| Changelog | Ana | 10 min |

- [x] Draft the notes
- [ ] Publish ~~Friday~~ Monday

```python
{CODE}
```

> Ship it when the checks are green."""


def streamed(prompt: str, split: int = 7, interval_ms: int = 10) -> str:
    """A message the fake answers with `You said: {prompt}`, in pieces of `split` characters."""
    return f"[[fake:chunks=1]] [[fake:split={split}]] [[fake:interval_ms={interval_ms}]] {prompt}"


async def reply_to(page: Page, message: str, timeout_ms: int = WAIT_MS) -> Locator:
    """Send `message` and wait for its reply to finish."""
    before = await messages(page, "assistant").count()
    await send(page, message)
    reply = messages(page, "assistant").nth(before)
    await expect(reply).to_have_attribute("data-state", "done", timeout=timeout_ms)
    return reply


async def render_module(page: Page, script: str, arg: Any = None) -> Any:
    """Run `script` (the body of an async function of `render` and `arg`) with the page's own
    render.js module, the very instance the page uses."""
    return await page.evaluate(
        f"async (arg) => {{ const render = await import('/static/render.js'); {script} }}", arg
    )


# 1. Markdown as people expect it.


async def test_replies_render_lists_tables_tasks_code_and_links(
    page: Page, chat_server: ChatbotProcess
) -> None:
    await open_chat(page, chat_server.url)
    reply = await reply_to(page, streamed(SAMPLE))
    body = text_of(reply)

    await expect(body.locator("strong")).to_have_text("release")
    await expect(body.locator("em")).to_have_text("two")
    await expect(body.locator("ol > li")).to_have_text(
        ["Run the tests with pytest -q", "Update the changelog", "Tag the release"]
    )
    await expect(body.locator("ol code.inline-code")).to_have_text("pytest -q")
    link = body.locator("a")
    await expect(link).to_have_text("changelog")
    assert await link.get_attribute("href") == "https://example.com/changelog"
    assert await link.get_attribute("target") == "_blank"
    assert await link.get_attribute("rel") == "noopener noreferrer"
    # Clicked, it opens a new tab that can neither reach back into the chat nor learn its URL.
    await page.context.route(
        "https://example.com/**", lambda route: route.fulfill(body="<title>changelog</title>")
    )
    async with page.context.expect_page() as opened:
        await link.click()
    tab = await opened.value
    await tab.wait_for_load_state()
    assert tab.url == "https://example.com/changelog"
    assert await tab.evaluate("[window.opener, document.referrer]") == [None, ""]
    await tab.close()

    table = body.locator(".table-wrap table")
    await expect(table.locator("th")).to_have_text(["Step", "Owner", "Time"])
    await expect(table.locator("tbody tr")).to_have_count(2)
    await expect(table.locator("tbody td")).to_have_text(
        ["Tests", "CI", "5 min", "Changelog", "Ana", "10 min"]
    )
    assert await table.locator("th").nth(2).evaluate("th => getComputedStyle(th).textAlign") == (
        "right"
    )

    boxes = body.locator("li input[type=checkbox]")
    await expect(boxes).to_have_count(2)
    assert [await b.is_checked() for b in await boxes.all()] == [True, False]
    assert [await b.is_disabled() for b in await boxes.all()] == [True, True]
    await expect(body.locator("del")).to_have_text("Friday")

    block = body.locator(".code-block")
    await expect(block.locator(".code-lang")).to_have_text("python")
    assert await block.locator("pre > code").text_content() == CODE
    await expect(block.get_by_test_id("copy")).to_have_text("Copy")
    await expect(body.locator("blockquote")).to_have_text("Ship it when the checks are green.")

    # Nothing of the Markdown syntax is left over as text.
    prose = await body.evaluate(
        "b => { const c = b.cloneNode(true); c.querySelectorAll('pre').forEach(e => e.remove());"
        " return c.textContent; }"
    )
    assert not re.search(r"[*|`~\[\]]|\]\(", prose), prose


# 2. Streaming without flicker or cost.

FRAME_RECORDER = """
(() => {
  window.__frames = [];
  new MutationObserver(() => {
    const m = document.querySelector('[data-role=assistant][data-state=streaming]');
    const body = m?.querySelector('[data-testid=message-text]');
    if (!body || body.hidden) return;
    const prose = body.cloneNode(true);
    prose.querySelectorAll('pre, .code-head').forEach((e) => e.remove());
    window.__frames.push({
      prose: prose.textContent,
      code: body.querySelector('pre > code')?.textContent ?? null,
      rows: body.querySelectorAll('tr').length,
      hrefs: [...body.querySelectorAll('a')].map((a) => a.getAttribute('href')),
    });
  }).observe(document, { subtree: true, childList: true, characterData: true });
})();
"""


async def test_a_reply_mid_stream_shows_no_half_written_markup(
    page: Page, chat_server: ChatbotProcess
) -> None:
    await page.add_init_script(FRAME_RECORDER)
    await open_chat(page, chat_server.url)
    await reply_to(page, streamed(SAMPLE, split=3, interval_ms=20), timeout_ms=60_000)
    frames: list[dict[str, Any]] = await page.evaluate("window.__frames")
    assert len(frames) > 20, frames  # it streamed, render by render

    for frame in frames:
        # No backticks of a fence still being written, no pipes of a table still missing its
        # delimiter row, no emphasis or link still open.
        assert not re.search(r"[*|`~\[]|\]\(", frame["prose"]), frame
        assert set(frame["hrefs"]) <= {"https://example.com/changelog"}, frame
    # An unfinished code fence is already a code block; a table grows row by row.
    partial_code = [f["code"] for f in frames if f["code"] is not None and f["code"] != CODE]
    assert partial_code and all(CODE.startswith(c) for c in partial_code), partial_code
    assert {1 + 1, 1 + 2} <= {f["rows"] for f in frames}, [f["rows"] for f in frames]


TRICKY = {
    "setext heading": "Title\n---\n\nText under it\n===\n\nafter",
    "list turning loose": "- a\n- b\n\n- c\n\n  still c\n\nafter",
    "list interrupting a paragraph": "Intro:\n- one\n- two\n1. three\n\n10. ten\n11. eleven",
    "fences": "````md\n```py\nx\n```\n````\n~~~\ntilde\n~~~\n\n    indented code\n\nend",
    "table then text": "| a | b |\n|---|:-:|\n| 1 | 2 |\nthree\n\n| x |\n|---|\n\npara",
    "definition after use": "See [the docs][d] and [d].\n\n- [ref][d]\n\n[d]: https://example.com/d",
    "definition before use": "[d]: https://example.com/d 'Docs'\n\nSee [the docs][d].",
    "quotes and html": "> quoted\nlazy\n\n<div>\n*raw*\n</div>\n\n<br> inline <b>x</b>",
    "crlf": "one\r\ntwo\r\n\r\n- item\r\n- item\r\n\r\n```\r\ncode\r\n```",
    "emphasis across lines": "**bold\nacross** and *em\nphasis* and `code\nspan` done",
    "headings and rules": "# One\n## Two\n***\n### Three\n___\ntext\n- - -",
}


async def test_streaming_renders_exactly_what_a_whole_render_does(
    page: Page, chat_server: ChatbotProcess
) -> None:
    """Block by block, character by character: the finished reply is what one render gives."""
    await open_chat(page, chat_server.url)
    results = await render_module(
        page,
        "return Object.entries(arg).map(([name, md]) => {"
        "  const streamed = document.createElement('div');"
        "  const view = new render.MarkdownView(streamed);"
        "  for (let i = 1; i <= md.length; i++) view.update(md.slice(0, i), false);"
        "  view.update(md, true);"
        "  const whole = document.createElement('div');"
        "  new render.MarkdownView(whole).update(md, true);"
        "  return [name, streamed.innerHTML, whole.innerHTML];"
        "});",
        TRICKY,
    )
    for name, streamed_html, whole_html in results:
        assert streamed_html == whole_html, name
        assert whole_html, name
    # A literal '<' or '*' early in a long line does not stall the rest of it.
    line = "If a < b and 5 * 3 > 14, then " + "the line goes on " * 40
    shown = await render_module(
        page,
        "const div = document.createElement('div');"
        "const view = new render.MarkdownView(div);"
        "const sizes = [];"
        "for (let i = 1; i <= arg.length; i++) {"
        "  view.update(arg.slice(0, i), false); sizes.push(div.textContent.length); }"
        "return sizes;",
        line,
    )
    assert all(size >= n - 170 for n, size in enumerate(shown, start=1)), shown
    links = await render_module(
        page,
        "const div = document.createElement('div');"
        "new render.MarkdownView(div).update(arg, true);"
        "return [...div.querySelectorAll('a')].map((a) => a.getAttribute('href'));",
        TRICKY["definition after use"],
    )
    assert links == ["https://example.com/d"] * 3


LONG_TASKS = """
window.__longTasks = [];
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) window.__longTasks.push(entry.duration);
}).observe({ type: 'longtask' });
"""


async def test_a_long_reply_is_parsed_block_by_block(
    page: Page, chat_server: ChatbotProcess
) -> None:
    """20,000 characters in 2,000 deltas: each render parses the open block, never the reply.

    The main thread's longest task is measured by `bench/render.py` (timing is not asserted in
    tests on a shared machine); here, that the parsing work stays bounded by the largest block,
    and that the streamed result is exactly what one whole render gives.
    """
    text = long_reply()
    assert 20_000 <= len(text) <= 21_000
    await open_chat(page, chat_server.url)
    await page.evaluate(LONG_TASKS)
    await render_module(
        page, "Object.assign(render.renderStats, {renders: 0, parsedChars: 0, longestParse: 0})"
    )
    reply = await reply_to(page, streamed(text, split=10, interval_ms=1), timeout_ms=120_000)

    stats = await render_module(page, "return {...render.renderStats};")
    assert stats["renders"] > 20, stats
    # Re-rendering the reply would parse up to 20,000 characters a time, about 10,000 on
    # average: millions of characters over hundreds of renders. Here each render parses the
    # open block and what arrived since the last render (183 characters at most in a block).
    assert stats["longestParse"] < len(text) / 4, stats
    assert stats["parsedChars"] < 10 * len(text), stats

    whole = await render_module(
        page,
        "const div = document.createElement('div');"
        "new render.MarkdownView(div).update(arg, true); return div.innerHTML;",
        reply_text(text, 1),
    )
    assert await text_of(reply).inner_html() == whole
    long_tasks = await page.evaluate("window.__longTasks")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "long-reply-render.json").write_text(
        json.dumps({"chars": len(text), "stats": stats, "long_tasks_ms": long_tasks}, indent=1)
    )


# 3. Hostile output stays inert.

XSS = "window.__xss=1"
UNSAFE_LINKS = [
    f"[a](javascript:{XSS})",
    f"[b](JaVaScRiPt:{XSS})",
    f"[c](javascript&#58;{XSS})",
    f"[d](&#106;avascript:{XSS})",
    f"[e](&#x6A;&#x61;vascript&colon;{XSS})",
    f"[f](java&#x09;script:{XSS})",
    f"[g](%6Aavascript:{XSS})",
    f"[h](<javascript:{XSS}>)",
    f"[i](javascript\\:{XSS})",
    f"[j]( javascript:{XSS} )",
    f"[k](\u0001javascript:{XSS})",
    "[l](data:text/html;base64,PHNjcmlwdD53aW5kb3cuX194c3M9MTwvc2NyaXB0Pg==)",
    "[m](vbscript:msgbox(1))",
    "[n](file:///etc/passwd)",
    "[o](//evil.example/x)",
    "[p][ref]",
    f"<javascript:{XSS}>",
    "<data:text/html,hello>",
    f"![q](javascript:{XSS})",
    "![r](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+)",
]
HOSTILE_HTML = [
    f"<svg onload={XSS}>",
    f"<svg><script>{XSS}</script></svg>",
    f'<div onclick="{XSS}">an HTML block</div>',
    f'<iframe src="javascript:{XSS}"></iframe>',
    f'<a href="javascript:{XSS}">a raw anchor</a>',
    "<style>body { display: none }</style>",
    f"<math><mtext><table><mglyph><style><img src=x onerror={XSS}>",
    f"<details open ontoggle={XSS}>",
    f'<form action="javascript:{XSS}"><button>go</button></form>',
    f"<img src=x onerror={XSS}>",
    f'[t](https://ok.example/ "x\\" onmouseover=\\"{XSS}")',
]
SAFE_AUTOLINKS = {
    "http://www.example.com": "www.example.com",
    "https://example.com/path": "https://example.com/path",
    "mailto:foo@example.com": "foo@example.com",
}
TRACKER = "https://tracker.example/pixel.png"


async def test_hostile_markdown_stays_inert(page: Page, chat_server: ChatbotProcess) -> None:
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    await open_chat(page, chat_server.url)
    hostile = "\n\n".join(
        [
            *UNSAFE_LINKS,
            *HOSTILE_HTML,
            f"![tracking pixel]({TRACKER})",
            " and ".join(SAFE_AUTOLINKS.values()),
            f"[ref]: javascript:{XSS}",
        ]
    )
    reply = await reply_to(page, streamed(hostile, split=40, interval_ms=5))
    body = text_of(reply)

    # Dispatch what a user would do to every element: nothing runs.
    await body.evaluate(
        "b => b.querySelectorAll('*').forEach(e => ['mouseover', 'focus', 'click', 'toggle']"
        ".forEach(t => { if (e.tagName !== 'A') e.dispatchEvent(new Event(t)); }))"
    )
    assert await page.evaluate("typeof window.__xss") == "undefined"
    tags = await body.evaluate("b => [...b.querySelectorAll('*')].map(e => e.localName)")
    assert set(tags) <= {"p", "a", "code"}, tags
    attributes = await body.evaluate(
        "b => [...b.querySelectorAll('*')].flatMap(e => [...e.attributes].map(a => a.name))"
    )
    assert set(attributes) <= {"href", "target", "rel", "title", "class"}, attributes

    links = await body.locator("a").evaluate_all(
        "as => as.map(a => [a.getAttribute('href'), a.target, a.rel, a.textContent])"
    )
    assert sorted(href for href, *_ in links) == sorted(
        [*SAFE_AUTOLINKS, TRACKER, "https://ok.example/"]
    )
    assert all(target == "_blank" and rel == "noopener noreferrer" for _, target, rel, _ in links)
    assert [text for href, *_, text in links if href == TRACKER] == ["Image: tracking pixel"]
    assert not any("tracker.example" in url or "evil.example" in url for url in requests)

    # What was refused is shown as the model wrote it.
    prose = await body.text_content() or ""
    for source in [*UNSAFE_LINKS, *HOSTILE_HTML[:-1]]:
        assert source.replace("&#58;", ":") in prose or source in prose, source


async def test_only_the_sanitizer_may_turn_text_into_html(
    browser: Browser, chat_server: ChatbotProcess
) -> None:
    """Trusted Types (the page's CSP): a string assigned to innerHTML anywhere in the page throws,
    so a future bug that bypasses DOMPurify fails loudly instead of rendering model output."""
    context = await browser.new_context()  # unwatched: this test breaks the rule on purpose
    try:
        page = await context.new_page()
        await open_chat(page, chat_server.url)
        outcome = await page.evaluate(
            "() => { try { document.createElement('div').innerHTML = '<b>x</b>'; return 'written';"
            " } catch (error) { return error.name; } }"
        )
        assert outcome == "TypeError"
        bold = await render_module(
            page,
            "const div = document.createElement('div');"
            "new render.MarkdownView(div).update('**still renders**', true);"
            "return div.querySelector('strong')?.textContent;",
        )
        assert bold == "still renders"
    finally:
        await context.close()


BOMBS = {
    "nested emphasis": "**" + "*a **" * 4_000,
    "underscores": "_a" * 10_000,
    "emphasis runs": "*_" * 10_000,
    "open brackets": "[" * 20_000 + "a",
    "nested links": "[a](" * 5_000,
    "backtick runs": "`a``" * 5_000,
    "angle brackets": "<" * 20_000,
    "nested quotes": "> " * 10_000 + "a",
    "nested lists": "- " * 10_000 + "a",
    "nested ordered lists": "1. " * 6_000 + "a",
    "wide table": "|" + "a|" * 3_300 + "\n|" + "-|" * 3_300 + "\n|" + "1|" * 3_300,
}


async def test_parser_bombs_neither_hang_nor_break_the_page(
    page: Page, chat_server: ChatbotProcess
) -> None:
    await open_chat(page, chat_server.url)
    for name, bomb in BOMBS.items():
        assert len(bomb) <= 20_010, name
        reply = await reply_to(page, streamed(bomb, split=500, interval_ms=5), timeout_ms=60_000)
        length = len(await text_of(reply).text_content() or "")
        assert length > 5_000, (name, length)  # shown, not dropped
        await page.get_by_test_id("new-chat").click()  # the next bomb in a page of its own
        await expect(messages(page)).to_have_count(0)
        await expect(page.get_by_test_id("status")).to_have_attribute("data-status", "connected")
    stats = await render_module(page, "return {...render.renderStats};")
    assert stats["longestMs"] < 5_000, stats  # a hang guard; bench/render.py measures timing


async def test_the_renderer_alone_refuses_every_unsafe_url(
    page: Page, chat_server: ChatbotProcess
) -> None:
    """Each payload on its own, straight into the page's renderer, final and mid-stream."""
    await open_chat(page, chat_server.url)
    results = await render_module(
        page,
        "return arg.map((md) => [true, false].map((final) => {"
        "  const div = document.createElement('div');"
        "  const view = new render.MarkdownView(div);"
        "  for (let i = 1; i <= md.length; i += 3) view.update(md.slice(0, i), false);"
        "  view.update(md, final);"
        "  const urls = [...div.querySelectorAll('[href], [src], [action]')];"
        "  return {md, final, hrefs: urls.map((e) => e.getAttribute('href') ??"
        "    e.getAttribute('src') ?? e.getAttribute('action')),"
        "    tags: [...div.querySelectorAll('*')].map((e) => e.localName)};"
        "}));",
        [*UNSAFE_LINKS, *HOSTILE_HTML],
    )
    for pair in results:
        for result in pair:
            assert all(re.match(r"https?://|mailto:", href) for href in result["hrefs"]), result
            assert set(result["tags"]) <= {"p", "a", "code"}, result
    assert await page.evaluate("typeof window.__xss") == "undefined"


# 4. Accessibility.

AXE_SOURCE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
WIDE_TABLE = (
    "| a rather wide | table | with | many | columns | that | overflow | a phone |\n"
    + "|---" * 8
    + "|\n"
    + "".join(f"| {n} " for n in range(8))
    + "|"
)


async def serious_violations(page: Page) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now."""
    if await page.evaluate("typeof window.axe") == "undefined":
        await page.evaluate(AXE_SOURCE.read_text())  # devtools evaluation: the page's CSP allows it
    result = await page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


@pytest.mark.parametrize(
    ("scheme", "width"), [("light", 1000), ("dark", 1000), ("light", 360), ("dark", 360)]
)
async def test_axe_finds_no_serious_violations(
    browser: Browser, chat_server: ChatbotProcess, scheme: str, width: int
) -> None:
    context = await browser.new_context(
        viewport={"width": width, "height": 800},
        color_scheme=scheme,  # type: ignore[arg-type]
    )
    try:
        page = await context.new_page()
        await open_chat(page, chat_server.url)
        assert await serious_violations(page) == []  # the empty page
        await reply_to(page, streamed(f"{SAMPLE}\n\n{WIDE_TABLE}", split=200))
        # Nothing wider than the screen: a wide table or code line scrolls inside its message.
        assert await page.evaluate("document.documentElement.scrollWidth") <= width
        failed = messages(page, "assistant").nth(1)
        await send(page, "[[fake:status=400]] this one fails")
        await expect(failed).to_have_attribute("data-state", "error", timeout=WAIT_MS)
        await page.get_by_test_id("composer").fill("a draft")
        violations = await serious_violations(page)
        assert violations == [], json.dumps(violations, indent=1)
    finally:
        await context.close()


async def focused(page: Page) -> str | None:
    return await page.evaluate(  # type: ignore[no-any-return]
        "document.activeElement?.dataset.testid ?? document.activeElement?.localName"
    )


async def tab_to(page: Page, testid: str, *, back: bool = False, limit: int = 40) -> None:
    """Press Tab (or Shift+Tab) until `testid` has the focus; it must be reachable."""
    seen = []
    for _ in range(limit):
        await page.keyboard.press("Shift+Tab" if back else "Tab")
        seen.append(await focused(page))
        if seen[-1] == testid:
            assert await page.evaluate("document.activeElement.matches(':focus-visible')")
            return
    raise AssertionError(f"{testid} not reached with the keyboard; focus went {seen}")


async def test_keyboard_alone_sends_stops_retries_copies_and_starts_over(
    context: BrowserContext, page: Page, chat_server: ChatbotProcess
) -> None:
    await context.grant_permissions(["clipboard-read", "clipboard-write"])
    await open_chat(page, chat_server.url)
    keys = page.keyboard

    # Send: Tab to the composer, type, Tab to Send, press Enter.
    await tab_to(page, "composer")
    await keys.insert_text(streamed(f"Example:\n\n```python\n{CODE}\n```", split=500))
    await tab_to(page, "send")
    await keys.press("Enter")
    reply = messages(page, "assistant").first
    await expect(reply).to_have_attribute("data-state", "done", timeout=WAIT_MS)

    # Copy: back into the conversation to the code block's Copy button.
    await tab_to(page, "composer", back=True)
    await tab_to(page, "copy", back=True)
    await keys.press("Enter")
    await expect(reply.get_by_test_id("copy")).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == CODE

    # Stop: a long reply, stopped from the keyboard with the Stop button.
    await tab_to(page, "composer")
    await keys.type("[[fake:chunks=300]] [[fake:interval_ms=30]] go on and on")
    await keys.press("Enter")
    second = messages(page, "assistant").nth(1)
    await expect(text_of(second)).to_contain_text("word3", timeout=WAIT_MS)
    await tab_to(page, "stop")
    await keys.press("Enter")
    await expect(second).to_have_attribute("data-reason", "cancelled", timeout=WAIT_MS)
    assert await focused(page) == "composer"  # Stop is gone: the focus is somewhere useful

    # Retry: a failed reply, retried from its Retry button.
    await keys.type("[[fake:status=400]] fails")
    await keys.press("Enter")
    third = messages(page, "assistant").nth(2)
    await expect(third).to_have_attribute("data-state", "error", timeout=WAIT_MS)
    await tab_to(page, "retry", back=True)
    await keys.press("Enter")
    await expect(messages(page, "user")).to_have_count(4, timeout=WAIT_MS)
    await expect(messages(page, "assistant").nth(3)).to_have_attribute(
        "data-state", "error", timeout=WAIT_MS
    )

    # New chat: back to the header.
    await tab_to(page, "new-chat", back=True)
    await keys.press("Enter")
    await expect(messages(page)).to_have_count(0)


ANNOUNCEMENTS = """
(() => {
  window.__announced = [];
  const record = () => {
    const text = document.querySelector('[data-testid=announcer]')?.textContent;
    if (text) window.__announced.push(text);
  };
  document.addEventListener('DOMContentLoaded', () => new MutationObserver(record).observe(
    document.querySelector('[data-testid=announcer]'),
    { subtree: true, childList: true, characterData: true },
  ));
})();
"""


async def test_a_finished_reply_is_announced_once(page: Page, chat_server: ChatbotProcess) -> None:
    await page.add_init_script(ANNOUNCEMENTS)
    await open_chat(page, chat_server.url)
    # What streams is not in a live region: a screen reader would read every delta.
    live = await page.evaluate(
        "[...document.querySelectorAll('[aria-live], [role=log], [role=status], [role=alert]')]"
        ".filter(e => e.getAttribute('aria-live') !== 'off').map(e => e.dataset.testid)"
    )
    assert "message-list" not in live and "announcer" in live, live

    await reply_to(page, "[[fake:chunks=12]] [[fake:interval_ms=20]] Is it **done**?")
    await page.wait_for_function("() => window.__announced.length > 0", timeout=WAIT_MS)
    expected = "Assistant: You said: Is it done? " + " ".join(f"word{k}" for k in range(1, 12))
    assert await page.evaluate("window.__announced") == [expected]

    await reply_to(page, "[[fake:chunks=3]] again")
    await page.wait_for_function("() => window.__announced.length > 1", timeout=WAIT_MS)
    assert await page.evaluate("window.__announced") == [
        expected,
        "Assistant: You said: again word1 word2",
    ]

    # A reload replays the conversation: shown again, announced never.
    await page.reload()
    await expect(messages(page, "assistant")).to_have_count(2, timeout=WAIT_MS)
    await expect(messages(page, "assistant").nth(1)).to_have_attribute("data-state", "done")
    await page.get_by_test_id("composer").fill("let any late announcement land")
    assert await page.evaluate("window.__announced") == []


# 5. The README's screenshot.


async def test_screenshot_of_a_formatted_reply(
    context: BrowserContext, chat_server: ChatbotProcess
) -> None:
    """test-artifacts/screenshot.png; docs/screenshot.png is a copy of it."""
    page = await context.new_page()
    await page.set_viewport_size({"width": 900, "height": 720})
    await open_chat(page, chat_server.url)
    await reply_to(page, streamed(SAMPLE, split=50))
    await page.get_by_test_id("composer").focus()
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "screenshot.png")
