"""Waiting for state that has no event to wait on (another process, another component's health)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from .procs import ChatbotProcess

POLL_S = 0.02


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Poll `check` until it is true; TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - the state lives elsewhere; nothing to await
            await asyncio.sleep(POLL_S)


async def readiness(server: ChatbotProcess) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as http:
        reply = await http.get(server.url + "/readyz")
    body: dict[str, Any] = reply.json()
    body["http_status"] = reply.status_code
    return body


async def metric(server: ChatbotProcess, sample: str, absent: float | None = None) -> float:
    """The value of `sample` in the server's /metrics: the lines that start with it, added up
    (a name alone adds up its labels; `name{label="x"}` or `"name "` picks one). A sample not
    there fails the test, unless `absent` says what it then counts as (a labelled counter has
    no line for a label it has not counted yet)."""
    async with httpx.AsyncClient(timeout=5) as http:
        scraped = (await http.get(server.url + "/metrics")).text
    values = [float(line.split()[-1]) for line in scraped.splitlines() if line.startswith(sample)]
    if not values and absent is not None:
        return absent
    assert values, f"no {sample!r} in /metrics"
    return sum(values)


async def wait_ready(servers: list[ChatbotProcess], timeout_s: float) -> float:
    """Seconds until every server's /readyz is 200; fails with their last answers after
    `timeout_s`."""
    started = time.monotonic()
    last: dict[str, Any] = {}

    async def all_ready() -> bool:
        for server in servers:
            try:
                last[server.name] = await readiness(server)
            except httpx.HTTPError as exc:
                last[server.name] = repr(exc)
                return False
        return all(isinstance(b, dict) and b["http_status"] == 200 for b in last.values())

    try:
        await wait_until(all_ready, timeout_s)
    except TimeoutError:
        raise AssertionError(f"not ready within {timeout_s} s: {last}") from None
    return time.monotonic() - started
