"""Hostile frames against a real server process (Hypercorn), where the in-process client differs:
the frame-size limit, compression, empty binary frames and text that UTF-8 cannot carry."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator

import pytest
import websockets

from chatbot.protocol import CloseCode

from .support.procs import ChatbotProcess

TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def server() -> Iterator[ChatbotProcess]:
    """The offline demo model at full speed; WS_MAX_MESSAGE_BYTES is the default, 65536."""
    chatbot = ChatbotProcess({"DEMO_WORD_DELAY_S": "0"}).start()
    yield chatbot
    chatbot.stop()


async def open_socket(
    url: str, query: str = "", **options: object
) -> tuple[websockets.ClientConnection, dict]:
    async with asyncio.timeout(TIMEOUT_S):
        ws = await websockets.connect(url + query, max_size=None, **options)  # type: ignore[arg-type]
        return ws, json.loads(await ws.recv())


async def chat_once(ws: websockets.ClientConnection, text: str) -> list[dict]:
    await ws.send(json.dumps({"type": "message", "text": text}))
    frames: list[dict] = []
    async with asyncio.timeout(TIMEOUT_S):
        while not frames or frames[-1]["type"] != "done":
            frames.append(json.loads(await ws.recv()))
    return frames


async def next_frame(ws: websockets.ClientConnection) -> dict:
    async with asyncio.timeout(TIMEOUT_S):
        return json.loads(await ws.recv())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("compression", "payload"),
    [
        (None, "x" * 100_000),
        # 100 KB that deflate squeezes into a few hundred bytes: the limit is on what the server
        # must hold once inflated, so a compression bomb is refused just the same.
        ("deflate", json.dumps({"type": "message", "text": "a" * 100_000})),
        (None, secrets.token_hex(50_000)),
    ],
    ids=["plain", "compressed", "random"],
)
async def test_an_oversized_frame_closes_with_1009_and_the_session_lives_on(
    server: ChatbotProcess, compression: str | None, payload: str
) -> None:
    ws, ready = await open_socket(server.ws_url, compression=compression)
    await ws.send(payload)
    with pytest.raises(websockets.ConnectionClosed):
        await next_frame(ws)
    assert ws.close_code == CloseCode.MESSAGE_TOO_BIG
    # The session is untouched: a new socket on it chats.
    again, resumed = await open_socket(server.ws_url, f"?session={ready['session']}")
    try:
        assert resumed["session"] == ready["session"]
        frames = await chat_once(again, "still here?")
        assert frames[0]["type"] == "user" and frames[-1]["reason"] == "stop"
    finally:
        await again.close()


async def test_an_empty_binary_frame_gets_an_error_not_a_closed_socket(
    server: ChatbotProcess,
) -> None:
    ws, _ = await open_socket(server.ws_url)
    try:
        await ws.send(b"")
        error = await next_frame(ws)
        assert (error["type"], error["code"]) == ("error", "unsupported_binary")
        assert (await chat_once(ws, "and now?"))[-1]["reason"] == "stop"
    finally:
        await ws.close()


async def test_text_with_a_lone_surrogate_is_refused_and_poisons_nothing(
    server: ChatbotProcess,
) -> None:
    # Valid JSON and valid UTF-8 on the wire, but "\ud800" decodes to half a UTF-16 pair, which
    # the server could never send back: stored, it would close every socket that replays it.
    ws, ready = await open_socket(server.ws_url)
    try:
        for frame in (
            '{"type": "message", "text": "half a pair: \\ud800"}',
            '{"type": "message", "id": "\\udfff", "text": "hi"}',
        ):
            await ws.send(frame)
            error = await next_frame(ws)
            assert (error["type"], error["code"]) == ("error", "invalid_frame")
            assert "surrogate" in error["message"]
        live = await chat_once(ws, "fine")
        assert live[0]["seq"] == 1  # nothing of the refused frames was stored
    finally:
        await ws.close()
    # The whole conversation replays (every frame encodable) on a new socket.
    ws, _ = await open_socket(server.ws_url, f"?session={ready['session']}&after=0")
    try:
        replayed = [await next_frame(ws) for _ in live]
    finally:
        await ws.close()
    assert replayed == live
