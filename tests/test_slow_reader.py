"""A client that stops reading is closed (1013) at its byte limit; nobody else slows down."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import pytest
import websockets

from chatbot.fake_openai import reply_text

from .support.frames import text_of
from .support.procs import ChatbotProcess, FakeOpenAIProcess

BACKLOG_BYTES = 256 * 1024
# ~6 MB of delta frames in ~3 s: past the limit plus what the kernel buffers for a client that
# stopped reading (its send buffer autotunes up to tcp_wmem's 4 MiB on loopback), while a reader
# that keeps up stays far under the limit.
CHUNKS = 3000
PAD = 2000


@pytest.fixture(scope="module")
def server() -> Iterator[ChatbotProcess]:
    fake = FakeOpenAIProcess("--ttft-ms", "0", "--chunks", "5", "--interval-ms", "0").start()
    env = {
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-test",
        "SOCKET_BACKLOG_BYTES": str(BACKLOG_BYTES),
        "MAX_REPLY_CHARS": str(2 * CHUNKS * PAD),  # the flood is ~6 MB of text: not cut short
    }
    chatbot = ChatbotProcess(env).start()
    yield chatbot
    chatbot.stop()
    fake.stop()


async def open_socket(url: str, **options: object) -> tuple[websockets.ClientConnection, dict]:
    async with asyncio.timeout(10):
        ws = await websockets.connect(url, compression=None, **options)  # type: ignore[arg-type]
        return ws, json.loads(await ws.recv())


async def read_to_done(ws: websockets.ClientConnection) -> list[dict]:
    frames = []
    async with asyncio.timeout(30):
        while not frames or frames[-1]["type"] != "done":
            frames.append(json.loads(await ws.recv()))
    return frames


async def test_a_stalled_reader_is_closed_and_resumes_while_fast_readers_get_everything(
    server: ChatbotProcess,
) -> None:
    # The stalled client: a tiny receive buffer and a frame queue of 1, and it never reads.
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    stalled, ready = await open_socket(server.ws_url, sock=raw, max_queue=1)
    session = ready["session"]
    fast = [await open_socket(f"{server.ws_url}?session={session}") for _ in range(3)]
    message = f"flood [[fake:chunks={CHUNKS}]] [[fake:pad={PAD}]] [[fake:interval_ms=1]]"
    await fast[0][0].send(json.dumps({"type": "message", "text": message}))
    results = await asyncio.gather(*(read_to_done(ws) for ws, _ in fast))
    expected = reply_text("flood", CHUNKS, PAD)
    logged = [f["seq"] for f in results[0]]
    assert logged == list(range(1, len(logged) + 1))  # user, the deltas, done: none missing
    for frames in results:
        assert frames == results[0]  # every fast reader got the same frames, all of them
        assert text_of(frames) == expected
    # Now the stalled client reads what reached it, then finds its socket closed with 1013.
    seen: list[dict] = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with asyncio.timeout(15):
            while True:
                seen.append(json.loads(await stalled.recv()))
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1013
    assert len(text_of(seen)) < len(expected)  # it fell behind before the reply ended
    # It resumes from its last seq and ends with exactly the full reply.
    last = seen[-1]["seq"] if seen else 0
    resumed, _ = await open_socket(f"{server.ws_url}?session={session}&after={last}")
    seen += await read_to_done(resumed)
    assert text_of(seen) == expected
    for ws, _ in [*fast, (resumed, None)]:
        await ws.close()
    assert "closing a socket that stopped reading" in server.output()
