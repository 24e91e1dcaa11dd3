"""Waiting for state that has no event to wait on (another process, another component's health)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

POLL_S = 0.02


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Poll `check` until it is true; TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - the state lives elsewhere; nothing to await
            await asyncio.sleep(POLL_S)
