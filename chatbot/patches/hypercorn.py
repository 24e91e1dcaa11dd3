"""Fixes to Hypercorn's WebSocket stream (and wsproto under it), at the layer that reads the bytes.

Hypercorn 0.18 has no setting for any of these (docs/security.md lists the attacks):

- **Frame size.** Hypercorn checks `websocket_max_message_size` only after a message chunk is
  buffered, then sends 1009 and goes on buffering (and reading) the rest of the frame: one
  100 MB frame cost the process ~98 MiB, never returned, and the client never saw the close.
  `EdgeGuard` refuses a frame when its *header* (or the running total of its message's
  fragments) passes the limit, before a byte of its payload is read.
- **Deflate bombs.** wsproto inflates a compressed frame whole (`decompress(data)` without a
  bound): a 60 KB frame of zeros becomes 60 MB. `EdgeGuard` inflates at most the limit, +1 byte.
- **Refusals without a close frame.** For a frame wsproto refuses (too big, bad UTF-8, a protocol
  error), Hypercorn drops the connection with no close frame (the client sees 1006).
  `_handle_events` sends the close frame with its code, then stops reading.
- **Closed sockets kept for a ping interval.** Hypercorn's ping loop sleeps a whole
  `websocket_ping_interval` (20 s) before it notices its socket closed, and the connection's task
  group, descriptor and memory wait for it. `_send_pings` wakes when the stream closes.
- **Pongs are dropped.** A client that only listens (answering our pings) looked idle to the app.
  Every ping or pong received is passed on as an `ACTIVITY` message.
- **permessage-deflate is always offered**; `EdgeGuard` declines it unless asked to accept it.
- **Close frames thrown away by a reset.** Hypercorn closes a connection once its last bytes are
  handed to the kernel, having stopped reading; a client that has not read them all yet (one that
  stopped reading is closed with 1013 with megabytes queued for it) and sends anything meanwhile
  (its library's keepalive ping, the pong to a ping of ours) makes the kernel answer with a reset
  that throws away everything still queued for it, the close frame too (RFC 1122 4.2.2.13): it
  sees 1006. `_close` shuts down writing and, while bytes of ours are still on their way, keeps
  the connection reading (and dropping) what comes until the client closes its side, for at most
  `WS_CLOSE_LINGER_S`; then resets it, which frees what the kernel holds for it too: a client
  that has not read its close frame by then is taken for dead.
- **Close frames stuck behind a ping.** Hypercorn's `protocol_send` holds one lock per connection
  across both writing a frame and waiting for the client to drain it. To a client that stopped
  reading, a ping of ours (every `WS_PING_INTERVAL_S`) or a pong to its ping waits for the
  drain forever, holding the lock; the close frame after it then waits for the lock until the
  app gives up (`CLOSE_TIMEOUT_S`), and is never written. `_send` writes each frame at once, in
  the order sent, and only then waits, without the lock, for the client to drain it.
- **Every closed connection is a reference cycle.** Hypercorn's `TCPServer` holds its protocol,
  which holds the server's `protocol_send`: ~40 objects per connection (and its buffers) that
  only the cyclic GC frees, which `chatbot serve` runs rarely over old objects
  (chatbot/collector.py). `_serve_connection` empties the server once its connection is done.
- **Connections held by a client that floods once the app is done with it.** Hypercorn holds at
  most 10 of a client's messages for the app (`max_app_queue_size`) and nobody takes them once
  the app has returned: past them its read loop, and the disconnect it queues when the stream
  ends, wait for ever, and the connection is never closed. The app drops what comes while it
  closes (`routes.websocket.Client.close`), but not in its last awaits after that (the socket
  place given back to Redis). `_handle` drops the client's messages once the app has returned.

Each fix replaces a Hypercorn method or wsproto hook whose source was read for this; `install`
checks those sources' fingerprints and refuses to start on a version they no longer match, so
an upgrade cannot silently undo a fix (tests/test_patches.py tells which one moved).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import weakref
from contextlib import suppress
from typing import Any, ClassVar

from hypercorn.asyncio import task_group
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.events import Closed, RawData
from hypercorn.protocol import ws_stream
from hypercorn.protocol.events import Data, Request, StreamClosed
from hypercorn.protocol.h11 import H11WSConnection
from hypercorn.protocol.ws_stream import FrameTooLargeError, Handshake, WSStream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, Pong
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, Opcode, RsvBits

from . import UnsupportedUpstream, changed

# What the app receives for a ping or pong from the client: proof of life, not a message.
ACTIVITY: dict[str, Any] = {"type": "chatbot.websocket.activity"}
# How long a connection whose frame was refused stays open for its close frame to be read.
REFUSAL_LINGER_S = 1.0
try:  # Linux's SIOCOUTQ: a socket's bytes not yet acknowledged by its peer
    from fcntl import ioctl
    from termios import TIOCOUTQ

    SIOCOUTQ: int | None = TIOCOUTQ
except ImportError:  # pragma: no cover - elsewhere a closing WebSocket always lingers
    SIOCOUTQ = None

# sha256 (first 16 hex digits) of the upstream source each fix replaces or relies on, as read
# in hypercorn 0.18.0 and wsproto 1.3.2. A mismatch means: read the new source, re-check the fix.
FINGERPRINTS = {
    "hypercorn WSStream._handle_events": "b90f3f595ff9fd47",
    "hypercorn WSStream._send_pings": "4721ce45cbdf91e6",
    "hypercorn WSStream.handle": "743209f49012b8c7",
    "hypercorn Handshake.accept": "e163533bf7919793",
    "wsproto FrameDecoder.process_buffer": "f19287e506f3178b",
    "wsproto FrameDecoder.parse_header": "ea1c4e4acf5fa1b3",
    "hypercorn TCPServer.run": "9437d01a916d887b",
    "hypercorn TCPServer._close": "ea76225e14315206",
    "hypercorn TCPServer._read_data": "8e7ad8f4bfca2fd2",
    "hypercorn TCPServer.protocol_send": "06144915fc094c1b",
    "hypercorn TaskGroup.spawn_app": "6606faaadfc368e3",
    "hypercorn task_group._handle": "e37cfe3db06eb470",
}


def _upstream() -> dict[str, Any]:
    return {
        "hypercorn WSStream._handle_events": _ORIGINAL["_handle_events"],
        "hypercorn WSStream._send_pings": _ORIGINAL["_send_pings"],
        "hypercorn WSStream.handle": _ORIGINAL["handle"],
        "hypercorn Handshake.accept": Handshake.accept,
        "wsproto FrameDecoder.process_buffer": FrameDecoder.process_buffer,
        "wsproto FrameDecoder.parse_header": FrameDecoder.parse_header,
        "hypercorn TCPServer.run": _ORIGINAL_RUN,
        "hypercorn TCPServer._close": _ORIGINAL_CLOSE,
        "hypercorn TCPServer._read_data": TCPServer._read_data,
        "hypercorn TCPServer.protocol_send": _ORIGINAL_SEND,
        "hypercorn TaskGroup.spawn_app": TaskGroup.spawn_app,
        "hypercorn task_group._handle": task_group._handle,
    }


def changed_upstream() -> list[str]:
    """The upstream functions whose source no longer matches the one the fixes were written for."""
    return changed(FINGERPRINTS, _upstream)


def install(max_message_bytes: int, *, deflate: bool, close_linger_s: float) -> None:
    """Apply every fix, for frames of at most `max_message_bytes` (after inflating), accepting
    permessage-deflate only when `deflate`, and letting a closed WebSocket connection linger
    for at most `close_linger_s`. Idempotent; the last call's limits win."""
    changed = changed_upstream()
    if changed:
        raise UnsupportedUpstream(
            "chatbot/patches/hypercorn.py was written for hypercorn 0.18.0 and wsproto 1.3.2; "
            f"these changed since: {', '.join(changed)}. Pin the old versions or review the fixes."
        )
    EdgeGuard.max_bytes, EdgeGuard.deflate = max_message_bytes, deflate
    Linger.seconds = close_linger_s
    # Hypercorn builds its extensions in `Handshake.accept` as `[PerMessageDeflate()]`, by this
    # name in its module's namespace (imported there from wsproto): a fresh guard per connection.
    vars(ws_stream)["PerMessageDeflate"] = EdgeGuard
    WSStream._handle_events = _handle_events  # type: ignore[method-assign]
    WSStream._send_pings = _send_pings  # type: ignore[method-assign]
    WSStream.handle = _handle  # type: ignore[method-assign]
    TCPServer.run = _serve_connection  # type: ignore[method-assign]
    TCPServer._close = _close  # type: ignore[method-assign]
    TCPServer.protocol_send = _send  # type: ignore[method-assign]


class EdgeGuard(PerMessageDeflate):
    """Always in wsproto's frame path (enabled whether or not compression was negotiated):
    refuses an oversized frame on its header, bounds inflation, and compresses only when
    negotiated (and allowed)."""

    max_bytes: ClassVar[int]
    deflate: ClassVar[bool]

    def __init__(self) -> None:
        super().__init__()
        self._message_bytes = 0  # on the wire, of the current message's finished frames
        self._frame_bytes = 0  # declared by the current frame's header
        self._control = False  # the current frame is a control frame (inside a message or not)
        self._inflated = 0  # of the current message

    def enabled(self) -> bool:
        return True

    def accept(self, offer: str) -> bool | str | None:
        return super().accept(offer) if self.deflate else None

    def frame_inbound_header(
        self, proto: Any, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        # wsproto calls this again for the same header when the masking key had not arrived
        # yet: only the frame's completion adds it to the message's total.
        self._control = opcode.iscontrol()
        if not self._control:
            if opcode is not Opcode.CONTINUATION:
                self._message_bytes = self._inflated = 0
            self._frame_bytes = payload_length
            if self._message_bytes + payload_length > self.max_bytes:
                return CloseReason.MESSAGE_TOO_BIG
        if not self._enabled:  # compression not negotiated: no reserved bit is ours
            return RsvBits(False, False, False)
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes | CloseReason:
        if not (self._enabled and self._inbound_compressed and self._inbound_is_compressible):
            return data
        assert self._decompressor is not None
        try:  # at most one byte past what is left of the limit: enough to know it is passed
            inflated = self._decompressor.decompress(
                bytes(data), self.max_bytes - self._inflated + 1
            )
        except Exception:  # zlib.error
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        return self._count(inflated)

    def frame_inbound_complete(self, proto: Any, fin: bool) -> bytes | CloseReason | None:
        if not self._control:
            self._message_bytes += self._frame_bytes
        if not self._enabled:
            return None
        # Everything the frame's payload inflated to was within the limit (or refused), so
        # the sync-flush trailer upstream inflates here releases at most zlib's small buffer.
        tail = super().frame_inbound_complete(proto, fin)
        return self._count(tail) if isinstance(tail, bytes) else tail

    def _count(self, inflated: bytes) -> bytes | CloseReason:
        self._inflated += len(inflated)
        return CloseReason.MESSAGE_TOO_BIG if self._inflated > self.max_bytes else inflated

    def frame_outbound(
        self, proto: Any, opcode: Opcode, rsv: RsvBits, data: bytes, fin: bool
    ) -> tuple[RsvBits, bytes]:
        if not self._enabled:
            return (rsv, data)
        return super().frame_outbound(proto, opcode, rsv, data, fin)


class Linger:
    """How long a closed WebSocket connection may wait for its client (`WS_CLOSE_LINGER_S`)."""

    seconds: ClassVar[float]


_ORIGINAL = {name: getattr(WSStream, name) for name in ("_handle_events", "_send_pings", "handle")}
_ORIGINAL_RUN = TCPServer.run
_ORIGINAL_CLOSE = TCPServer._close
_ORIGINAL_SEND = TCPServer.protocol_send


async def _serve_connection(self: TCPServer) -> None:
    """Hypercorn's `TCPServer.run`, then the server emptied: nothing uses it once its connection
    is closed and its task group has ended, and the references between it and its protocol
    would otherwise leave the whole connection to the cyclic GC."""
    try:
        await _ORIGINAL_RUN(self)
    finally:
        deadline = self.__dict__.get("_chatbot_linger")
        if deadline is not None:
            deadline.cancel()
        self.__dict__.clear()


async def _send(self: TCPServer, event: Any) -> None:
    """Hypercorn's `TCPServer.protocol_send`, without its lock: the bytes are written at once, so
    in the order they are sent, and each sender then waits for the drain on its own. Beyond the
    transport's high-water mark this buffers at most one frame per sending task (the app's,
    the ping loop's, the read loop's pong or close)."""
    if not isinstance(event, RawData):
        return await _ORIGINAL_SEND(self, event)
    try:
        self.writer.write(event.data)
        await self.writer.drain()
    except (ConnectionError, RuntimeError):
        await self.protocol.handle(Closed())


async def _close(self: TCPServer) -> None:
    """Hypercorn's `TCPServer._close`, lingering on a WebSocket connection whose client has not
    taken all our bytes yet: writing is shut down (a FIN follows the close frame), and `run`'s
    read loop, which drops what comes once the stream is closed, goes on until the client closes
    its side; then `run` closes the connection. Reset after `Linger.seconds`."""
    writer = self.writer
    with suppress(NotImplementedError, OSError, RuntimeError):
        writer.write_eof()
    if _lingers(self):
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # the server is stopping: no time for it
            _reset(writer)
        else:
            if "_chatbot_linger" not in self.__dict__:
                self.__dict__["_chatbot_linger"] = self.loop.call_later(
                    Linger.seconds, _reset, writer
                )
            if not self.reader.at_eof():
                return  # `run`'s read loop ends at the client's EOF (or the reset) and closes
    await _ORIGINAL_CLOSE(self)


def _lingers(self: TCPServer) -> bool:
    """Whether closing now could cost the client bytes of ours: a WebSocket connection still
    open, with bytes in the transport's buffer or not yet acknowledged by the client."""
    writer = self.writer
    if writer.transport.is_closing():
        return False
    protocol = getattr(getattr(self, "protocol", None), "protocol", None)  # H11Protocol
    if not isinstance(getattr(protocol, "connection", None), H11WSConnection):
        return False
    if writer.transport.get_write_buffer_size():
        return True
    if SIOCOUTQ is None:  # pragma: no cover - not Linux
        return True
    sock = writer.get_extra_info("socket")
    try:
        unacknowledged = ioctl(sock.fileno(), SIOCOUTQ, bytes(4))
    except (AttributeError, OSError):  # pragma: no cover - not a TCP socket
        return True
    (count,) = struct.unpack("i", unacknowledged)
    return bool(count > 0)


def _reset(writer: asyncio.StreamWriter) -> None:
    """End the connection at once with a reset, which also frees what the kernel still holds
    for the client."""
    sock = writer.get_extra_info("socket")
    with suppress(AttributeError, OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _handle_events(self: WSStream) -> None:
    """Hypercorn's `WSStream._handle_events`, with refusals closed properly and pongs passed on."""
    assert self.app_put is not None
    for event in self.connection.events():
        if isinstance(event, Message):
            try:
                self.buffer.extend(event)
            except FrameTooLargeError:  # (EdgeGuard refuses such a message first)
                await _refuse(self, CloseReason.MESSAGE_TOO_BIG)
                break
            if event.message_finished:
                await self.app_put(self.buffer.to_message())
                self.buffer.clear()
        elif isinstance(event, Ping):
            await self._send_wsproto_event(event.response())
            await self.app_put(ACTIVITY)
        elif isinstance(event, Pong):
            await self.app_put(ACTIVITY)
        elif isinstance(event, CloseConnection):
            if self.connection.state is ConnectionState.OPEN:
                # Not the peer's close: wsproto refused a frame (ParseFailed) and says why.
                await _refuse(self, event.code, event.reason)
                break
            if self.connection.state == ConnectionState.REMOTE_CLOSING:
                await self._send_wsproto_event(event.response())
            await self.send(StreamClosed(stream_id=self.stream_id))


async def _refuse(self: WSStream, code: int, reason: str | None = None) -> None:
    """Close with `code` and read no more of the connection: what the client still sends (the
    rest of a 300 MB frame) is dropped unparsed, for at most REFUSAL_LINGER_S. The connection is
    not cut at once because a client still sending would get a reset before reading the close
    frame, and see 1006 instead of why."""
    if code == CloseReason.MESSAGE_TOO_BIG:
        reason = f"message too big: at most {EdgeGuard.max_bytes} bytes"
    # A close frame's reason is at most 123 bytes of UTF-8.
    reason = (reason or "").encode()[:120].decode(errors="ignore")
    await self._send_wsproto_event(CloseConnection(code=code, reason=reason))
    self.__dict__["_chatbot_refused"] = True  # ours, on Hypercorn's stream
    # The app hears of it when the stream ends: were it told now, its return would end the
    # stream at once, and the reset race the close frame.
    self.task_group.spawn(_linger, self)


async def _linger(self: WSStream) -> None:
    """End a refused stream once the client has closed, or after REFUSAL_LINGER_S."""
    await _sleep_unless_closed(self, REFUSAL_LINGER_S)
    if not self.closed:
        await self.send(StreamClosed(stream_id=self.stream_id))


async def _send_pings(self: WSStream) -> None:
    """Hypercorn's ping loop, woken as soon as the stream closes instead of a ping interval
    later."""
    interval = self.config.websocket_ping_interval
    assert interval is not None  # Hypercorn starts this loop only when one is set
    while not self.closed:
        await self._send_wsproto_event(Ping())
        await _sleep_unless_closed(self, interval)


async def _handle(self: WSStream, event: Any) -> None:
    if isinstance(event, Data) and getattr(self, "_chatbot_refused", False):
        return  # the rest of a refused connection: dropped unread
    if isinstance(event, Request):  # the handshake: the app is started with `self.app_send`
        vars(self)["app_send"] = _AppDone(self, type(self).app_send)
    await _ORIGINAL["handle"](self, event)
    if isinstance(event, Request) and self.app_put is not None:
        self.app_put = _AppPut(self, self.app_put)
    if self.closed:
        for waiter in getattr(self, "_chatbot_sleepers", ()):
            if not waiter.done():
                waiter.set_result(None)


class _AppDone:
    """The app's `send`, which learns from Hypercorn's last call (`None`, once the app has
    returned) that nobody will take the client's messages any more: those queued are dropped,
    which frees the read loop if it waits for room, and `_AppPut` drops the next ones."""

    __slots__ = ("send", "stream")

    def __init__(self, stream: WSStream, send: Any) -> None:
        # The stream holds this: a weak reference to it and its class's `app_send` (not the bound
        # method, which holds the stream), or every closed connection's objects would be a
        # cycle left to the cyclic GC (see `_serve_connection`).
        self.stream, self.send = weakref.ref(stream), send

    async def __call__(self, message: Any) -> None:
        stream = self.stream()
        if message is None and stream is not None:
            vars(stream)["_chatbot_app_done"] = True
            put = stream.app_put
            queue = getattr(getattr(put, "put", put), "__self__", None)  # `spawn_app`'s queue
            if isinstance(queue, asyncio.Queue):
                while not queue.empty():
                    queue.get_nowait()  # each wakes a sender waiting for room
        if stream is not None:
            await self.send(stream, message)


class _AppPut:
    """Hypercorn's `app_put` (the app's queue, 10 messages), dropping what comes once the app has
    returned."""

    __slots__ = ("put", "stream")

    def __init__(self, stream: WSStream, put: Any) -> None:
        self.stream, self.put = weakref.ref(stream), put  # weak: as `_AppDone`'s

    async def __call__(self, message: Any) -> None:
        stream = self.stream()
        if stream is not None and not vars(stream).get("_chatbot_app_done", False):
            del stream
            await self.put(message)


async def _sleep_unless_closed(self: WSStream, seconds: float) -> None:
    """Sleep `seconds`, or until the stream closes (one timer, no task)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    sleepers: set[asyncio.Future[None]] = self.__dict__.setdefault("_chatbot_sleepers", set())
    sleepers.add(waiter)

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(seconds, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        sleepers.discard(waiter)
