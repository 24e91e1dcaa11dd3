"""Reading JSON frames from any WebSocket client in tests: every receive has a timeout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import websockets

Frame = dict[str, Any]
RECEIVE_TIMEOUT_S = 10.0


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


class Client(FrameReader):
    """A real WebSocket client (the `websockets` library) with receive timeouts."""

    timeout_s = RECEIVE_TIMEOUT_S

    def __init__(self, ws: Any, ready: dict[str, Any]) -> None:
        self.ws = ws
        self.ready = ready
        self.session: str = ready["session"]
        self.server: str | None = ws.response.headers.get("X-Chatbot-Server")

    async def _receive(self) -> str | bytes:
        return await self.ws.recv()  # type: ignore[no-any-return]

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))


@asynccontextmanager
async def connect(
    url: str, session: str | None = None, after: int | None = None
) -> AsyncIterator[Client]:
    query = "&".join(
        f"{k}={v}" for k, v in (("session", session), ("after", after)) if v is not None
    )
    async with asyncio.timeout(RECEIVE_TIMEOUT_S):
        ws = await websockets.connect(f"{url}?{query}" if query else url, open_timeout=5)
    try:
        async with asyncio.timeout(RECEIVE_TIMEOUT_S):
            ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        yield Client(ws, ready)
    finally:
        async with asyncio.timeout(5):
            await ws.close()


async def reply_over(
    url: str, text: str | None = None, session: str | None = None, after: int | None = None
) -> tuple[str, str]:
    """On a real server: open a socket (on `session`, replaying from `after`), send `text` if
    given, and read up to the reply's `done`; the reply's text and the session."""
    async with connect(url, session, after) as client:
        if text is not None:
            await client.send({"type": "message", "id": "m1", "text": text})
        frames = await client.until_done()
    assert frames[-1]["reason"] == "stop", frames[-1]
    return text_of(frames), client.session
