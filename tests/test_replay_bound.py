"""A replay of the whole log (`after=0`) is read a page at a time as the socket sends it, within
SOCKET_BACKLOG_BYTES, not held whole by every socket that asks for it. Against a real server
process, counting its peak RSS while ten sockets replay a ~9 MB conversation and do not read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
import websockets

from .support.procs import ChatbotProcess
from .support.rawws import RawSocket, reset_peak_rss, status_kib

# The log holds ~9 MB of user events (and ~6,000 deltas): more than the kernel takes into a
# socket that does not read (its send buffer autotunes up to tcp_wmem's 4 MiB on loopback), so
# each socket is still replaying when the peak is read.
MESSAGES = 150
CHARS = 60_000
SOCKETS = 10
MIB = 1024


@pytest.fixture(scope="module")
def server() -> Iterator[ChatbotProcess]:
    env = {
        "DEMO_WORD_DELAY_S": "0",
        "MAX_MESSAGE_CHARS": str(CHARS),
        "WS_MAX_MESSAGE_BYTES": str(12 * CHARS + 256),
        "RATE_LIMIT_SESSION": "100000/minute",
        "RATE_LIMIT_IP": "100000/minute",
        "SESSION_TOKEN_BUDGET": "1000000000/day",
        "IP_TOKEN_BUDGET": "1000000000/day",
        "SESSION_LOG_MAX_EVENTS": "20000",
    }
    chatbot = ChatbotProcess(env).start()
    yield chatbot
    chatbot.stop()


async def write_long_conversation(server: ChatbotProcess) -> str:
    async with asyncio.timeout(60), websockets.connect(server.ws_url, max_size=None) as ws:
        session = str(json.loads(await ws.recv())["session"])
        for n in range(MESSAGES):
            await ws.send(json.dumps({"type": "message", "text": f"{n} " + "x" * (CHARS - 8)}))
            while (frame := json.loads(await ws.recv()))["type"] != "done":
                assert frame["type"] != "error", frame  # e.g. a limit: fail now, not at the timeout
    return session


async def test_sockets_replaying_a_long_log_hold_a_page_each(server: ChatbotProcess) -> None:
    session = await write_long_conversation(server)
    reset_peak_rss(server.pid)
    before = status_kib(server.pid, "VmHWM")
    sockets = [
        await RawSocket.open(server.port, f"/ws?session={session}&after=0") for _ in range(SOCKETS)
    ]
    try:
        for sock in sockets:  # each has read the log and is sending it: ready, then seq 1
            async with asyncio.timeout(10):
                ready = json.loads(await sock.read_text())
                first = json.loads(await sock.read_text())
            assert (ready["session"], first["seq"], first["type"]) == (session, 1, "user")
        growth = status_kib(server.pid, "VmHWM") - before
    finally:
        for sock in sockets:
            sock.close()
    # Whole, the log is ~9 MB a socket; a page is 64 KiB of frames (with their parsed copies).
    assert growth < SOCKETS * MIB, f"peak RSS grew {growth} KiB for {SOCKETS} replaying sockets"
