"""The fixes to Hypercorn's WebSocket stream (chatbot/patches/hypercorn.py), against a real server
process: oversized frames refused on their header, deflate bombs, pongs as proof of life, and
closed sockets released at once. Memory is counted as the process's peak RSS while the attack
arrives, not just what is left after it."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator

import pytest
import websockets

from chatbot.patches import hypercorn as hypercorn_fixes
from chatbot.protocol import CloseCode

from .support.procs import ChatbotProcess, RedisProcess, tcp_sockets
from .support.rawws import (
    BINARY,
    CONTINUATION,
    TEXT,
    RawSocket,
    deflated,
    frame,
    header,
    reset_peak_rss,
    status_kib,
)
from .support.waiting import wait_ready, wait_until

MIB = 1024
LIMIT = 65536  # WS_MAX_MESSAGE_BYTES's default
DEFLATE = {"Sec-WebSocket-Extensions": "permessage-deflate"}


@pytest.fixture(scope="module")
def server() -> Iterator[ChatbotProcess]:
    chatbot = ChatbotProcess({"DEMO_WORD_DELAY_S": "0", "WS_PERMESSAGE_DEFLATE": "true"}).start()
    yield chatbot
    chatbot.stop()


async def warm_up(server: ChatbotProcess) -> None:
    """One ordinary chat first: what the process allocates once (caches, lazy imports) is not
    the attack's."""
    async with asyncio.timeout(10), websockets.connect(server.ws_url) as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "message", "text": "hello"}))
        while json.loads(await ws.recv())["type"] != "done":
            pass


async def attack(
    server: ChatbotProcess, clients: int, send: object, headers: dict[str, str] | None = None
) -> tuple[int, list[int]]:
    """Run `send(socket)` from `clients` raw sockets at once; the growth of the server's peak
    RSS (KiB) and the close code each client saw."""
    await warm_up(server)
    sockets = [await RawSocket.open(server.port, headers=headers) for _ in range(clients)]
    assert all(s.status == 101 for s in sockets)
    reset_peak_rss(server.pid)
    before = status_kib(server.pid, "VmHWM")
    closes = [asyncio.ensure_future(s.read_until_close(30)) for s in sockets]
    await asyncio.gather(*(send(s) for s in sockets))  # type: ignore[operator]
    codes = [code for code, _ in await asyncio.gather(*closes)]
    for s in sockets:
        s.close()
    return status_kib(server.pid, "VmHWM") - before, codes


@pytest.mark.parametrize("megabytes", [100, 300])
async def test_a_frame_declared_too_big_is_refused_on_its_header(
    server: ChatbotProcess, megabytes: int
) -> None:
    size = megabytes * 1_000_000

    async def send(sock: RawSocket) -> None:
        await sock.send(header(TEXT, size))
        await sock.stream(size)

    growth, codes = await attack(server, 1, send)
    assert codes == [CloseCode.MESSAGE_TOO_BIG]
    assert growth < 1 * MIB, f"peak RSS grew {growth} KiB for one {megabytes} MB frame"


async def test_fragments_are_refused_when_their_message_passes_the_limit(
    server: ChatbotProcess,
) -> None:
    piece = b"x" * 16_384

    async def send(sock: RawSocket) -> None:
        await sock.send(frame(TEXT, piece, fin=False))
        for _ in range(2_000):  # 32 MB in all, if the server kept reading
            try:
                await sock.send(frame(CONTINUATION, piece, fin=False))
            except ConnectionError:
                return

    growth, codes = await attack(server, 4, send)
    assert codes == [CloseCode.MESSAGE_TOO_BIG] * 4
    assert growth < 4 * MIB, f"peak RSS grew {growth} KiB for 4 fragmenting clients"


async def test_a_deflate_bomb_is_refused_as_it_inflates(server: ChatbotProcess) -> None:
    # 60 MB of zeros deflate to ~58 KB: under the limit on the wire, 900 times it inflated.
    bomb = deflated(bytes(60_000_000))
    assert len(bomb) < LIMIT

    async def send(sock: RawSocket) -> None:
        assert "permessage-deflate" in sock.head
        await sock.send(frame(BINARY, bomb, rsv1=True))

    growth, codes = await attack(server, 8, send, DEFLATE)
    assert codes == [CloseCode.MESSAGE_TOO_BIG] * 8
    assert growth < 8 * MIB, f"peak RSS grew {growth} KiB for 8 deflate bombs"


def test_the_fixes_match_the_installed_hypercorn_and_wsproto() -> None:
    """A Hypercorn or wsproto upgrade that changes a patched function fails here, by name (and
    `chatbot serve` refuses to start) until the fix is reviewed against the new source."""
    assert hypercorn_fixes.changed_upstream() == []


async def test_a_client_that_only_answers_pings_is_not_taken_for_idle() -> None:
    """WS_IDLE_TIMEOUT_S is 1 s and the reply takes ~4 s: the client sends its message, then
    only listens, answering the server's WebSocket pings (as browsers and `websockets` do)."""
    env = {"WS_IDLE_TIMEOUT_S": "1", "WS_PING_INTERVAL_S": "0.25", "DEMO_WORD_DELAY_S": "0.1"}
    chatbot = ChatbotProcess(env).start()
    try:
        async with asyncio.timeout(20), websockets.connect(chatbot.ws_url) as ws:
            json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "message", "text": "a long answer, please"}))
            frames = []
            while not frames or frames[-1]["type"] != "done":
                frames.append(json.loads(await ws.recv()))
            assert frames[-1]["reason"] == "stop"
        # A client that does not answer pings is still taken for dead.
        sock = await RawSocket.open(chatbot.port)
        code, reason = await sock.read_until_close(timeout_s=10)
        sock.close()
        assert (code, reason) == (CloseCode.POLICY_VIOLATION, "idle: send a ping")
    finally:
        chatbot.stop()


async def test_a_client_flooding_while_its_socket_closes_cannot_hold_the_connection() -> None:
    """After the handler's close and before it returns (the socket place given back to Redis,
    here held up by a paused Redis), a client sends far more than the 10 messages Hypercorn
    holds for the app. Once the handler has returned, they are dropped: the connection ends."""
    redis = RedisProcess().start()
    env = {"REDIS_URL": redis.url, "WS_IDLE_TIMEOUT_S": "1", "REDIS_TIMEOUT_S": "2"}
    server = ChatbotProcess({"DEMO_WORD_DELAY_S": "0", **env})
    try:
        server.start()
        await wait_ready([server], 15)
        client = await RawSocket.open(server.port)
        client_port = client.writer.get_extra_info("sockname")[1]
        assert json.loads(await client.read_text())["type"] == "ready"
        redis.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            await client.read_until_close(timeout_s=15)  # idle: the handler closes
            for _ in range(200):  # while the handler waits on Redis
                await client.send(frame(TEXT, b'{"type":"ping"}'))
        finally:
            redis.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]

        async def connection_gone() -> bool:
            return not tcp_sockets(server.port, client_port)

        await wait_until(connection_gone, timeout_s=15)
        client.close()
    finally:
        server.stop()
        redis.stop()
