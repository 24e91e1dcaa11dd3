"""A WebSocket client at the byte level, for what well-behaved client libraries refuse to send:
a frame header promising 300 MB, fragments past the limit, a deflate bomb. And the resources of
the server process under test (RSS, peak RSS, descriptors), read from /proc."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import struct
import zlib
from contextlib import suppress
from pathlib import Path

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
CHUNK = b"x" * (1 << 20)


def header(opcode: int, length: int, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """A client frame header with the all-zero mask, so the payload goes on the wire as is."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if length < 126:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    return head + b"\0\0\0\0"


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    return header(opcode, len(payload), fin=fin, rsv1=rsv1) + payload


def deflated(payload: bytes) -> bytes:
    """`payload` compressed as permessage-deflate sends it (raw deflate, sync-flush tail cut)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


class RawSocket:
    """One WebSocket connection driven byte by byte. `head` is the server's HTTP answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str):
        self.reader, self.writer, self.head = reader, writer, head

    @classmethod
    async def open(
        cls, port: int, path: str = "/ws", headers: dict[str, str] | None = None
    ) -> RawSocket:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            key = base64.b64encode(secrets.token_bytes(16)).decode()
            lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket"]
            lines += ["Connection: Upgrade", f"Sec-WebSocket-Key: {key}"]
            lines += ["Sec-WebSocket-Version: 13"]
            lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            return cls(reader, writer, head)

    @property
    def status(self) -> int:
        return int(self.head.split(" ", 2)[1])

    async def read_frame(self) -> tuple[int, bytes]:
        """The next server frame's opcode and payload (servers do not mask)."""
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(length)

    async def read_text(self) -> str:
        """The next text frame's text, skipping the server's pings."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == TEXT:
                return payload.decode()
            if opcode == CLOSE:
                raise ConnectionError(f"closed: {payload[:2].hex()} {payload[2:].decode()}")

    async def read_until_close(self, timeout_s: float = 10.0) -> tuple[int, str]:
        """Skip frames until the close frame: its code and reason."""
        async with asyncio.timeout(timeout_s):
            while True:
                opcode, payload = await self.read_frame()
                if opcode == CLOSE:
                    (code,) = struct.unpack("!H", payload[:2])
                    return code, payload[2:].decode()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()
        await asyncio.sleep(0)  # `drain` may not yield: let this client read what comes, too

    async def stream(self, total: int) -> int:
        """Send `total` bytes of payload (a megabyte at a time) until the server stops taking
        them; the number sent."""
        sent = 0
        with suppress(ConnectionError):
            while sent < total:
                piece = CHUNK[: min(len(CHUNK), total - sent)]
                self.writer.write(piece)
                async with asyncio.timeout(10):
                    await self.writer.drain()
                await asyncio.sleep(0)
                sent += len(piece)
        return sent

    def close(self) -> None:
        self.writer.close()


def status_kib(pid: int, field: str) -> int:
    """A `VmRSS`/`VmHWM`-style field of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss(pid: int) -> None:
    """Make the process's peak RSS (VmHWM) its current RSS, so a later peak is measurable."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
