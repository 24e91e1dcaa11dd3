"""`python -m bench.edge`: the attacks of docs/security.md's edge table against a real server
process, each with what it costs the server (peak RSS growth, descriptors) and what the
attacker saw. The tests assert the limits; this prints the figures the docs quote.

Run it from a checkout (it drives the server with the tests' raw WebSocket client).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

from tests.support.procs import ChatbotProcess
from tests.support.rawws import (
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

Send = Callable[[RawSocket], Awaitable[None]]
DEFLATE = {"Sec-WebSocket-Extensions": "permessage-deflate"}


async def attack(server: ChatbotProcess, clients: int, send: Send, **headers: str) -> str:
    sockets = [await RawSocket.open(server.port, headers=headers or None) for _ in range(clients)]
    reset_peak_rss(server.pid)
    before = status_kib(server.pid, "VmHWM")
    closes = [asyncio.ensure_future(s.read_until_close(60)) for s in sockets]
    await asyncio.gather(*(send(s) for s in sockets))
    seen = await asyncio.gather(*closes, return_exceptions=True)
    for s in sockets:
        s.close()
    growth = status_kib(server.pid, "VmHWM") - before
    saw = sorted({str(x) if isinstance(x, BaseException) else f"close {x[0]}" for x in seen})
    return f"peak RSS +{growth / 1024:.1f} MiB; the client(s) saw: {', '.join(saw)}"


def big_frame(megabytes: int) -> Send:
    async def send(sock: RawSocket) -> None:
        size = megabytes * 1_000_000
        await sock.send(header(TEXT, size))
        await sock.stream(size)

    return send


async def fragments(sock: RawSocket) -> None:
    piece = b"x" * 16_384
    await sock.send(frame(TEXT, piece, fin=False))
    for _ in range(2_000):
        try:
            await sock.send(frame(CONTINUATION, piece, fin=False))
        except ConnectionError:
            return


BOMB = deflated(bytes(60_000_000))


async def bomb(sock: RawSocket) -> None:
    await sock.send(frame(BINARY, BOMB, rsv1=True))


async def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    server = ChatbotProcess({"WS_PERMESSAGE_DEFLATE": "true"}).start()
    try:
        for name, clients, send, headers in [
            ("one 100 MB frame", 1, big_frame(100), {}),
            ("one 300 MB frame", 1, big_frame(300), {}),
            ("4 clients fragmenting 32 MB messages", 4, fragments, {}),
            ("8 deflate bombs (58 KB -> 60 MB)", 8, bomb, DEFLATE),
        ]:
            print(f"{name}: {await attack(server, clients, send, **headers)}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
