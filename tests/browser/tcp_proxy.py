"""A TCP proxy the test can sever: every connection through it drops at once, the server stays up.

It forwards bytes verbatim (HTTP and WebSocket alike), so the browser talks to the real server
through it; `sever()` aborts both ends of every open connection (the browser sees a dropped socket,
the server sees its client vanish), and `refuse()` makes new connections fail until `accept()`.
"""

from __future__ import annotations

import asyncio
import contextlib

CONNECT_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0


class TcpProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.upstream_port = upstream_port
        self.port = 0
        self.refusing = False
        self.connections_accepted = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def sever(self) -> int:
        """Abort every open connection, both sides; returns how many transports were cut."""
        cut = len(self._transports)
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()
        return cut

    def refuse(self) -> None:
        """New connections are dropped as soon as they arrive (the server looks unreachable)."""
        self.refusing = True

    def accept(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.sever()
        for task in list(self._tasks):
            task.cancel()
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.refusing:
                writer.transport.abort()
                return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    up_reader, up_writer = await asyncio.open_connection(
                        self.host, self.upstream_port
                    )
            except (OSError, TimeoutError):
                writer.transport.abort()
                return
            self.connections_accepted += 1
            ends = (writer.transport, up_writer.transport)
            self._transports.update(ends)
            try:
                pumps = [
                    asyncio.create_task(_pump(reader, up_writer)),
                    asyncio.create_task(_pump(up_reader, writer)),
                ]
                # Either side ending ends the connection: browsers do not half-close.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
            finally:
                for transport in ends:
                    transport.abort()
                    self._transports.discard(transport)
        finally:
            self._tasks.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
