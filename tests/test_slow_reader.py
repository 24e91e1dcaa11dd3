"""A client that stops reading is closed (1013) at its byte limit and gets that close whenever it
reads again within WS_CLOSE_LINGER_S; one that never does is let go then; nobody else slows down."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import pytest
import websockets

from chatbot.fake_openai import reply_text
from chatbot.protocol import CloseCode

from .support.frames import text_of
from .support.procs import ChatbotProcess, FakeOpenAIProcess, tcp_sockets
from .support.waiting import metric, wait_until

BACKLOG_BYTES = 256 * 1024
# ~6 MB of delta frames in ~3 s: past the limit plus what the kernel buffers for a client that
# stopped reading (its send buffer autotunes up to tcp_wmem's 4 MiB on loopback), while a reader
# that keeps up stays far under the limit.
CHUNKS = 3000
PAD = 2000
FLOOD = f"flood [[fake:chunks={CHUNKS}]] [[fake:pad={PAD}]] [[fake:interval_ms=1]]"
CLOSED_FOR_STALLING = "closing a socket that stopped reading"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIProcess]:
    upstream = FakeOpenAIProcess("--ttft-ms", "0", "--chunks", "5", "--interval-ms", "0").start()
    yield upstream
    upstream.stop()


def start_chatbot(fake: FakeOpenAIProcess, **env: str) -> ChatbotProcess:
    return ChatbotProcess(
        {
            "OPENAI_BASE_URL": fake.base_url,
            "OPENAI_API_KEY": "sk-test",
            "SOCKET_BACKLOG_BYTES": str(BACKLOG_BYTES),
            "MAX_REPLY_CHARS": str(2 * CHUNKS * PAD),  # the flood is ~6 MB of text: not cut short
            "IP_TOKEN_BUDGET": "1000000000/day",  # each flood is 1.5M tokens, all from 127.0.0.1
            **env,
        }
    ).start()


@pytest.fixture(scope="module")
def server(fake: FakeOpenAIProcess) -> Iterator[ChatbotProcess]:
    # Pings every 20 ms, not 20 s: one is then always queued behind the backlog of a client that
    # stopped reading when the server closes it, as in production once a stall outlasts
    # WS_PING_INTERVAL_S.
    chatbot = start_chatbot(fake, WS_PING_INTERVAL_S="0.02")
    yield chatbot
    chatbot.stop()


async def open_socket(url: str, **options: object) -> tuple[websockets.ClientConnection, dict]:
    async with asyncio.timeout(10):
        ws = await websockets.connect(url, compression=None, **options)  # type: ignore[arg-type]
        return ws, json.loads(await ws.recv())


async def open_stalled(
    server: ChatbotProcess, url: str | None = None, **options: object
) -> tuple[websockets.ClientConnection, dict]:
    """A client that does not read: a tiny receive buffer and a frame queue of 1. It has read
    `ready` (returned), and reads nothing more until the test says so."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    return await open_socket(url or server.ws_url, sock=raw, max_queue=1, **options)


async def read_to_done(ws: websockets.ClientConnection) -> list[dict]:
    frames = []
    async with asyncio.timeout(30):
        while not frames or frames[-1]["type"] != "done":
            frames.append(json.loads(await ws.recv()))
    return frames


async def read_to_close(ws: websockets.ClientConnection) -> tuple[list[dict], int | None]:
    """Every frame until the connection ends, and the code of the close frame that ended it
    (None: the connection ended without one)."""
    seen: list[dict] = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with asyncio.timeout(15):
            while True:
                seen.append(json.loads(await ws.recv()))
    received = closed.value.rcvd
    return seen, None if received is None else received.code


async def sockets_open(server: ChatbotProcess) -> float:
    return await metric(server, "chatbot_websockets_open ")


async def test_a_stalled_reader_is_closed_and_resumes_while_fast_readers_get_everything(
    server: ChatbotProcess,
) -> None:
    closes_before = server.output().count(CLOSED_FOR_STALLING)
    before = await sockets_open(server)
    stalled, ready = await open_stalled(server)
    session = ready["session"]
    fast = [await open_socket(f"{server.ws_url}?session={session}") for _ in range(3)]
    await fast[0][0].send(json.dumps({"type": "message", "text": FLOOD}))

    async def stalled_reads() -> tuple[list[dict], int | None]:
        # Once the server has closed it and let it go, the stalled client reads what reached
        # it, then finds its socket closed with 1013.
        async def let_go() -> bool:
            return await sockets_open(server) <= before + len(fast)

        await wait_until(let_go, timeout_s=30)
        return await read_to_close(stalled)

    (seen, code), *results = await asyncio.gather(
        stalled_reads(), *(read_to_done(ws) for ws, _ in fast)
    )
    assert server.output().count(CLOSED_FOR_STALLING) == closes_before + 1
    expected = reply_text("flood", CHUNKS, PAD)
    logged = [f["seq"] for f in results[0]]
    assert logged == list(range(1, len(logged) + 1))  # user, the deltas, done: none missing
    for frames in results:
        assert frames == results[0]  # every fast reader got the same frames, all of them
        assert text_of(frames) == expected
    assert code == CloseCode.TRY_AGAIN_LATER
    assert len(text_of(seen)) < len(expected)  # it fell behind before the reply ended
    # It resumes from its last seq and ends with exactly the full reply.
    last = seen[-1]["seq"] if seen else 0
    resumed, _ = await open_socket(f"{server.ws_url}?session={session}&after={last}")
    seen += await read_to_done(resumed)
    assert text_of(seen) == expected
    for ws, _ in [*fast, (resumed, None)]:
        await ws.close()


@pytest.mark.parametrize(
    "client_pings", [False, True], ids=["behind-a-server-ping", "pinging-after-its-close"]
)
async def test_a_stalled_client_gets_its_1013_when_it_reads_again_after_the_server_let_go(
    server: ChatbotProcess, client_pings: bool
) -> None:
    """The server closes the stalled socket, waits CLOSE_TIMEOUT_S for the client to take the
    close frame, and ends the socket (its handler returns); only then does the client read.
    The close frame was queued behind a ping of the server's, which never drains; and in the
    second case the client says something first (as its library's keepalive ping would) while
    megabytes are still on their way to it. Either way it reads all it was sent, then 1013."""
    before = await sockets_open(server)
    stalled, _ = await open_stalled(server, ping_interval=None)  # it pings when the test says
    await stalled.send(json.dumps({"type": "message", "text": FLOOD}))

    async def let_go() -> bool:
        return await sockets_open(server) <= before

    await wait_until(let_go, timeout_s=30)
    if client_pings:
        await stalled.ping()
    seen, code = await read_to_close(stalled)
    assert code == CloseCode.TRY_AGAIN_LATER
    seqs = [f["seq"] for f in seen]
    assert seqs == list(range(1, len(seqs) + 1))
    assert 0 < len(text_of(seen)) < CHUNKS * PAD


async def test_a_client_talking_while_its_socket_closes_is_let_go_once_it_has_read_its_close(
    server: ChatbotProcess,
) -> None:
    """While the server waits for a stalled client to take its close frame, the client sends
    more than the 10 messages Hypercorn holds for the app. They are dropped: the connection
    still ends (a FIN after the close frame) as soon as the client has read everything."""
    closes_before = server.output().count(CLOSED_FOR_STALLING)
    before = await sockets_open(server)
    # It waits as long as it takes for the server to end the connection after the close.
    stalled, _ = await open_stalled(server, ping_interval=None, close_timeout=60)
    client_port = stalled.local_address[1]
    await stalled.send(json.dumps({"type": "message", "text": FLOOD}))

    async def closing() -> bool:
        return server.output().count(CLOSED_FOR_STALLING) > closes_before

    async def let_go() -> bool:
        return await sockets_open(server) <= before

    async def connection_gone() -> bool:
        return not tcp_sockets(server.port, client_port)

    await wait_until(closing, timeout_s=30)
    for _ in range(20):
        await stalled.send(json.dumps({"type": "ping"}))
    await wait_until(let_go, timeout_s=10)
    seen, code = await read_to_close(stalled)
    assert code == CloseCode.TRY_AGAIN_LATER
    assert not any(f["type"] == "pong" for f in seen)  # after its close: dropped, not answered
    await wait_until(connection_gone, timeout_s=10)


async def test_a_client_that_never_reads_again_is_let_go_after_the_linger(
    fake: FakeOpenAIProcess,
) -> None:
    """A client that took nothing of its close (the megabytes before it) in WS_CLOSE_LINGER_S is
    taken for dead: its connection is reset, which frees what the server's kernel held for it."""
    server = start_chatbot(fake, WS_CLOSE_LINGER_S="1")
    try:
        stalled, _ = await open_stalled(server, ping_interval=None)
        client_port = stalled.local_address[1]
        await stalled.send(json.dumps({"type": "message", "text": FLOOD}))

        async def closed_by_server() -> bool:
            return CLOSED_FOR_STALLING in server.output()

        async def connection_gone() -> bool:
            return not tcp_sockets(server.port, client_port)

        await wait_until(closed_by_server, timeout_s=30)
        await wait_until(connection_gone, timeout_s=15)  # the close's 2 s, the linger's 1 s
        _, code = await read_to_close(stalled)
        assert code is None  # reset: it never read its close frame
    finally:
        server.stop()
