"""How long the page's main thread is blocked while a long reply streams in as Markdown.

    python -m bench.render               # 3 runs of each reply shape, then the worst task of each
    python -m bench.render --runs 1

A real chatbot server (in-process broker) relays the fake OpenAI server, which streams each reply
in 2,000 deltas of 10 characters, 1 ms apart (a fast model; every animation frame has new text).
Headless Chromium (Debian's) shows the page; a PerformanceObserver collects the main thread's
long tasks (over 50 ms, the long-task API) and a Chromium trace times every task; the report
gives the longest task between the reply's first text and its `done`, the number over 50 ms, and
render.js's own count of the characters it parsed. Reply shapes: `mixed` (a model's long answer:
headings, prose, lists, tables and code blocks), and the worst cases for block-by-block
rendering, one block of 20,000 characters: `one-code-block`, `one-paragraph` and `one-list`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Page, async_playwright

from .procs import Server, chatbot_env, free_port, python

DELTA_CHARS = 10
DELTA_INTERVAL_MS = 1
MAX_MESSAGE_CHARS = 25_000
CHROMIUM = "/usr/bin/chromium"
STREAM_TIMEOUT_S = 180
TRACE_CATEGORIES = [
    "disabled-by-default-devtools.timeline",
    "devtools.timeline",
    "blink.user_timing",
]


def long_reply(min_chars: int = 20_000) -> str:
    """A long answer shaped like a model's: headings, prose, lists, tables and code."""
    sections: list[str] = []
    n = 0
    while sum(len(s) for s in sections) < min_chars:
        n += 1
        sections.append(
            f"## Step {n}: configure part {n}\n\n"
            f"Part {n} reads its settings once at start-up, so a **bad value** fails early "
            f"with a message that names the variable; see `settings_{n}.py` and the "
            f"[guide](https://example.com/guide/{n}).\n\n"
            f"- Set `PART_{n}_URL` to the service\n- Keep *timeouts* short\n"
            f"- [ ] Check the logs of part {n}\n\n"
            f"| Option | Default | Effect |\n|---|---:|---|\n"
            f"| `retries` | {n} | attempts before failing |\n"
            f"| `timeout_s` | {n * 5} | per call |\n\n"
            f"```python\ndef configure_{n}(settings):\n"
            f"    client = Client(settings.url, timeout={n * 5})\n"
            f"    return client.connect(retries={n})\n```\n\n"
        )
    return "".join(sections).rstrip()


def shapes(chars: int = 20_000) -> dict[str, str]:
    line = "    value = compute(value, step)  # one more line of code\n"
    item = "- an item of a long list, with **bold** and `code`\n"
    words = "a sentence of a very long paragraph with *some* emphasis. "
    return {
        "mixed": long_reply(chars),
        "one-code-block": "```python\n" + line * (chars // len(line)) + "```",
        "one-paragraph": (words * (chars // len(words))).strip(),
        "one-list": item * (chars // len(item)),
    }


WATCH = """
() => {
  window.__bench = { longTasks: [], firstText: null, done: null };
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) window.__bench.longTasks.push([e.startTime, e.duration]);
  }).observe({ type: 'longtask' });
  new MutationObserver(() => {
    const reply = document.querySelector('[data-role=assistant]');
    const body = reply?.querySelector('[data-testid=message-text]');
    if (body && !body.hidden && window.__bench.firstText === null) {
      window.__bench.firstText = performance.mark('reply-first-text').startTime;
    }
    if (reply?.dataset.state === 'done' && window.__bench.done === null) {
      window.__bench.done = performance.mark('reply-done').startTime;
    }
  }).observe(document.body, { subtree: true, childList: true, attributes: true });
}
"""


def longest_task_ms(trace: bytes) -> float:
    """The longest task the page's main thread ran between the reply's first text and its done,
    from a Chromium trace (every task, not only those over 50 ms)."""
    events = json.loads(trace)["traceEvents"]
    marks = {e["name"]: e for e in events if e["name"] in ("reply-first-text", "reply-done")}
    first, done = marks["reply-first-text"], marks["reply-done"]
    main = (first["pid"], first["tid"])
    tasks = [
        e["dur"]
        for e in events
        if e["name"] == "RunTask"
        and (e["pid"], e["tid"]) == main
        and e["ts"] + e.get("dur", 0) >= first["ts"]
        and e["ts"] <= done["ts"]
    ]
    return round(max(tasks, default=0) / 1000, 1)


async def one_run(browser: Browser, page: Page, url: str, text: str) -> dict[str, Any]:
    await page.goto(url)
    await page.wait_for_selector("[data-testid=status][data-status=connected]", timeout=20_000)
    await page.evaluate(WATCH)
    await page.evaluate(
        "async () => Object.assign((await import('/static/render.js')).renderStats,"
        " {renders: 0, parsedChars: 0, longestParse: 0, longestMs: 0})"
    )
    directives = (
        f"[[fake:chunks=1]] [[fake:split={DELTA_CHARS}]] [[fake:interval_ms={DELTA_INTERVAL_MS}]]"
    )
    composer = page.get_by_test_id("composer")
    await composer.fill(f"{directives} {text}")
    await browser.start_tracing(page=page, categories=TRACE_CATEGORIES)
    await composer.press("Enter")
    await page.wait_for_function(
        "() => window.__bench.done !== null", timeout=STREAM_TIMEOUT_S * 1000, polling=200
    )
    await page.wait_for_timeout(300)  # let the observer deliver the last entries
    trace = await browser.stop_tracing()
    bench = await page.evaluate("window.__bench")
    stats = await page.evaluate(
        "async () => ({...(await import('/static/render.js')).renderStats})"
    )
    start, end = bench["firstText"], bench["done"]
    during = [d for t, d in bench["longTasks"] if t + d >= start and t <= end]
    return {
        "stream_s": round((end - start) / 1000, 2),
        "longest_task_ms": longest_task_ms(trace),
        "long_tasks_over_50ms": len(during),
        "renders": stats["renders"],
        "longest_render_ms": round(stats["longestMs"], 1),
        "parsed_chars": stats["parsedChars"],
        "longest_parse": stats["longestParse"],
    }


async def measure(runs: int) -> dict[str, list[dict[str, Any]]]:
    logs = Path(tempfile.mkdtemp(prefix="bench-render-"))
    fake_port, port = free_port(), free_port()
    fake = Server(
        "fake-openai",
        [python(), "-m", "chatbot.fake_openai", "--port", str(fake_port), "--ttft-ms", "50"],
        port=fake_port,
        log_dir=logs,
        health_path=None,
    ).start()
    env = chatbot_env(
        port,
        fake_port,
        MAX_MESSAGE_CHARS=str(MAX_MESSAGE_CHARS),
        WS_MAX_MESSAGE_BYTES=str(12 * MAX_MESSAGE_CHARS + 256),
        RATE_LIMIT_IP="1000/minute",
        RATE_LIMIT_SESSION="1000/minute",
        LOG_LEVEL="WARNING",
    )
    server = Server(
        "chatbot", [python(), "-m", "chatbot", "serve"], port=port, log_dir=logs, env=env
    )
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        server.start()
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            try:
                for name, text in shapes().items():
                    for _ in range(runs):
                        context = await browser.new_context(viewport={"width": 1000, "height": 800})
                        page = await context.new_page()
                        result = await one_run(browser, page, f"http://127.0.0.1:{port}", text)
                        await context.close()
                        results.setdefault(name, []).append({"chars": len(text), **result})
                        print(name, json.dumps(results[name][-1]), flush=True)
            finally:
                await browser.close()
    finally:
        server.stop()
        fake.stop()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    results = asyncio.run(measure(args.runs))
    print(f"\n{'reply':<16}{'chars':>7}{'longest task ms (runs)':>30}{'median':>8}")
    for name, runs in results.items():
        tasks = [r["longest_task_ms"] for r in runs]
        cells = ", ".join(f"{t:.0f}" for t in tasks)
        print(f"{name:<16}{runs[0]['chars']:>7}{cells:>30}{statistics.median(tasks):>8.0f}")
    sys.exit(0)


if __name__ == "__main__":
    main()
