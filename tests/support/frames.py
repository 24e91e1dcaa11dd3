"""Reading JSON frames from any WebSocket client in tests: every receive has a timeout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

Frame = dict[str, Any]


class FrameReader:
    """Subclasses say how to receive one raw frame (`_receive`) and how long to wait for it."""

    timeout_s = 5.0

    async def _receive(self) -> str | bytes:
        raise NotImplementedError

    async def recv(self, timeout_s: float | None = None) -> Frame:
        async with asyncio.timeout(timeout_s or self.timeout_s):
            return json.loads(await self._receive())  # type: ignore[no-any-return]

    async def until(
        self, predicate: Callable[[Frame], bool], timeout_s: float | None = None
    ) -> list[Frame]:
        """Frames up to and including the first that matches `predicate`."""
        frames = []
        async with asyncio.timeout(timeout_s or self.timeout_s):
            while True:
                frames.append(await self.recv(timeout_s))
                if predicate(frames[-1]):
                    return frames

    async def until_done(self, timeout_s: float | None = None) -> list[Frame]:
        return await self.until(lambda f: f["type"] == "done", timeout_s)


def text_of(frames: list[Frame], reply_to: str | None = None) -> str:
    """The reply text the `delta` frames add up to (of one reply, with `reply_to`)."""
    return "".join(
        f["text"] for f in frames if f["type"] == "delta" and reply_to in (None, f["reply_to"])
    )


def seqs(frames: list[Frame]) -> list[int]:
    return [f["seq"] for f in frames if "seq" in f]
