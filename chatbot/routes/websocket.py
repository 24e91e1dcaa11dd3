"""`/ws`: one chat socket. A reader and a sender task per socket, the first to end ends both.

Served at the ASGI level, in front of Quart (`create_app` routes `/ws` here), not by a Quart
`@websocket` route. Quart's websocket layer adds, per socket, two tasks, an unbounded queue of
received frames (which defeats Hypercorn's bounded one, so a flooding client grows memory) and a
request context with its own copy of the headers: 13.6 KiB of an idle socket's memory under
Hypercorn (docs/benchmarks.md), and two signal dispatches per frame. Here a frame goes from
Hypercorn's queue to the handler, and from the sender to Hypercorn, with nothing in between.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, suppress
from enum import Enum
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .. import logs, metrics, protocol
from ..chat.feed import Feed
from ..chat.limits import client_ip
from ..chat.service import ChatService
from ..errors import CANNOT_ACCEPT, BrokerUnavailable, ChatbotError, SessionExpired, refusal
from ..patches.hypercorn import ACTIVITY
from ..protocol import CloseCode
from ..runtime import Closing, Runtime
from ..watchdog import Watchdog
from .access import socket_credentials, token_ok

log = logging.getLogger(__name__)

PATH = "/ws"
# Bound on closing a socket and on stopping its jobs: a stalled peer or a stuck job lets go.
CLOSE_TIMEOUT_S = 2.0
ACTIVITY_TYPE = ACTIVITY["type"]
# A socket's refused frames that get a log line each; the rest are counted into one at its end.
LOGGED_REFUSALS = 10
FORWARDED_FOR = b"x-forwarded-for"  # every line of it, in order: `client_ip` says why

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HandshakeHeaders(dict[str, str]):
    """The handshake's headers by lower-case name, the first of a repeated one winning, read in
    any case as werkzeug's `Headers` are. Building werkzeug's (it checks every value) cost
    0.15 ms of CPU per handshake."""

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        pairs = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]
        super().__init__(reversed(pairs))

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


class Ending(Enum):
    """What ended a socket first; the values are the order `_first_to_end` awaits them in."""

    EXPIRED = 0  # the sender: the feed ended, the session expired and the client was told
    CLIENT = 1  # the receiver: the client left, or went silent past WS_IDLE_TIMEOUT_S
    RESTART = 2  # the instance is restarting
    SLOW_READER = 3  # the feed overflowed: the client stopped reading


class ClientGone(Exception):
    """The client closed the connection (ASGI `websocket.disconnect`)."""


class Client:
    """The ASGI side of one socket: what the handler sends and receives, nothing kept besides."""

    __slots__ = ("_receive", "_send", "subprotocol")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.subprotocol: str | None = None  # to answer the client's offer with

    async def accept(self) -> None:
        await self._send({"type": "websocket.accept", "subprotocol": self.subprotocol})

    def send(self, text: str) -> Awaitable[None]:
        return self._send({"type": "websocket.send", "text": text})

    async def receive(self) -> str | bytes | None:
        """The next frame's text (or bytes), None for a WebSocket ping or pong from the client
        (`patches.hypercorn.ACTIVITY`); `ClientGone` once the client has left."""
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                return text if text is not None else (message.get("bytes") or b"")
            if kind == "websocket.disconnect":
                raise ClientGone
            if kind == ACTIVITY_TYPE:
                return None
            # `websocket.connect` comes first from a server (not from Quart's test client):
            # the handshake is answered by accept() or refuse().

    async def close(self, code: CloseCode, reason: str) -> None:
        """Close with `code`; a client that stopped reading may not take the close frame
        either, so after CLOSE_TIMEOUT_S let go: the frame stays queued behind what the client
        has not read, and the connection lingers for it (`patches.hypercorn`, WS_CLOSE_LINGER_S).

        Meanwhile what the client sends is dropped unread: Hypercorn holds at most 10 of its
        messages for the app, and once they are not taken, its read loop and the disconnect it
        hands the app when the stream ends wait for ever: the connection was never closed."""
        dropping = asyncio.ensure_future(self._drop_received())
        try:
            with suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._send({"type": "websocket.close", "code": code, "reason": reason})
        finally:
            dropping.cancel()
            await asyncio.wait([dropping])

    async def _drop_received(self) -> None:
        with suppress(ClientGone):
            while True:
                await self.receive()

    async def refuse(
        self, scope: Scope, status: int, reason: str, retry_after_s: int | None = None
    ) -> None:
        """Refuse the handshake with an HTTP status (the ASGI `websocket.http.response`
        extension, which Hypercorn offers; a server without it answers 403)."""
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await self._send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})
            return
        body = f"{status} {reason}\n".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
        ]
        if retry_after_s is not None:
            headers.append((b"retry-after", b"%d" % retry_after_s))
        await self._send(
            {"type": "websocket.http.response.start", "status": status, "headers": headers}
        )
        await self._send({"type": "websocket.http.response.body", "body": body})

    async def refuse_error(
        self, scope: Scope, exc: ChatbotError, unavailable: str = CANNOT_ACCEPT
    ) -> None:
        """Refuse the handshake as the HTTP routes answer `exc` (`errors.STATUSES`), logged."""
        answer = refusal(exc, unavailable=unavailable)
        level = logging.WARNING if answer.serious else logging.INFO
        log.log(level, "refused websocket: %s", exc)
        await self.refuse(scope, answer.status, answer.message, answer.retry_after_s)


async def chat_socket(scope: Scope, receive: Receive, send: Send, runtime: Runtime) -> None:
    """Serve one `/ws` connection: check the handshake, open the session, chat until the client
    leaves, goes silent, falls too far behind, or the server restarts."""
    service, closing, config = runtime.service, runtime.closing, runtime.settings
    headers = HandshakeHeaders(scope["headers"])
    logs.bind_request(headers.get(logs.REQUEST_ID_HEADER))
    args: dict[str, str] = {}
    for name, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
        args.setdefault(name, value)  # the first of repeated names, as Quart's `args.get`
    client = Client(receive, send)
    origin = headers.get("Origin")
    proto = headers.get("X-Forwarded-Proto") if config.trusted_proxy_hops else None
    scheme = _socket_scheme(scope.get("scheme", "ws"), proto)
    if not origin_allowed(origin, headers.get("Host"), config.allowed_origins, scheme):
        log.warning("refused websocket from origin %r", origin[:100] if origin else origin)
        return await client.refuse(scope, 403, "origin not allowed")
    try:
        credentials = socket_credentials(scope.get("subprotocols") or (), args)
    except ChatbotError as exc:
        return await client.refuse_error(scope, exc)
    client.subprotocol = credentials.subprotocol
    if not token_ok(config.access_token, headers, credentials.token):
        log.warning("refused websocket without a valid access token")
        return await client.refuse(scope, 401, "a valid access token is required")
    after_arg = args.get("after")
    if after_arg is not None and not (
        after_arg.isascii() and after_arg.isdigit() and len(after_arg) < 19
    ):
        log.info("refused websocket with after=%r", after_arg[:20])
        return await client.refuse(scope, 400, "after must be a seq (a whole number)")
    asked = credentials.session
    if asked is not None:
        try:
            protocol.check_id(asked, "session")
        except ChatbotError as exc:
            return await client.refuse_error(scope, exc)
    if closing.is_set():  # restarting: the client reconnects, through the balancer, elsewhere
        return await client.refuse(scope, 503, "restarting")
    peer = scope.get("client")
    forwarded = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == FORWARDED_FOR]
    ip = client_ip(peer[0] if peer else None, forwarded, config.trusted_proxy_hops)
    del headers  # nothing of the handshake is kept for the socket's lifetime but what it needs
    try:
        await service.limits.check_handshake(ip)
        async with service.limits.socket(ip):
            session, last = await service.open_session(asked)
            # Without `after` the socket starts live; `after` past the log's end means the end.
            after = last if after_arg is None else min(int(after_arg), last)
            logs.bind_session(session)
            metrics.socket_connected(resumed=after_arg is not None)
            # The epoch the client's `after` belongs to; another one means its seqs are void.
            epoch = args.get("epoch") if after_arg is not None else None
            await _serve(client, service, closing, session, last, after, epoch, ip)
    except ChatbotError as exc:
        await client.refuse_error(scope, exc, "the service cannot open sessions right now")
    except Exception:  # before accept (after it, _serve closes with 1011 itself)
        log.exception("websocket handshake failed")
        await client.refuse(scope, 500, "internal error")


async def _serve(
    client: Client,
    service: ChatService,
    closing: Closing,
    session: str,
    last: int,
    after: int,
    epoch: str | None,
    ip: str,
) -> None:
    await client.accept()
    metrics.SOCKETS_OPEN.inc()
    try:
        async with AsyncExitStack() as stack:
            try:
                feed = await stack.enter_async_context(service.feed(session, after))
            except BrokerUnavailable as exc:
                # `ready` promises a live socket: without a confirmed subscription, the client
                # is told to come back (a Redis blip, or its pub/sub listener reconnecting).
                log.warning("session %s…: socket refused, not live: %s", session[:6], exc)
                await client.close(CloseCode.TRY_AGAIN_LATER, "not live yet: try again")
                return
            if epoch is not None and epoch != feed.epoch:
                feed.last_seq = 0  # the data it saw is gone: it gets the whole log again
            model = service.model
            ready = protocol.ready(session, last, model.name, model.demo, feed.epoch)
            await client.send(protocol.encode(ready))
            with closing.watch() as restart:
                ended, gone = await _first_to_end(
                    asyncio.ensure_future(_send_all(client, feed)),
                    asyncio.ensure_future(_receive_all(client, feed, service, session, ip)),
                    restart,
                    feed.overflowed,
                )
        if ended is Ending.EXPIRED:
            await client.close(CloseCode.NORMAL, "session expired")
        elif ended is Ending.CLIENT and not gone:
            log.info("session %s…: closing a socket silent for too long", session[:6])
            await client.close(CloseCode.POLICY_VIOLATION, "idle: send a ping")
        elif ended is Ending.RESTART:
            # What the feed holds goes first: the `done interrupted` of a reply the restart cut.
            feed.end()
            with suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await _send_all(client, feed)
            await client.close(CloseCode.SERVICE_RESTART, "service restart")
        elif ended is Ending.SLOW_READER:
            metrics.SLOW_READER_CLOSES.inc()
            log.warning("session %s…: closing a socket that stopped reading", session[:6])
            await client.close(
                CloseCode.TRY_AGAIN_LATER, "too slow: reconnect and resume with after"
            )
    except asyncio.CancelledError:
        raise  # the server is stopping
    except Exception:
        log.exception("websocket for session %s… failed", session[:6])
        await client.close(CloseCode.INTERNAL_ERROR, "internal error")
    finally:
        metrics.SOCKETS_OPEN.dec()


async def _first_to_end(
    sender: asyncio.Task[None],
    receiver: asyncio.Task[bool],
    restart: asyncio.Future[None],
    overflow: asyncio.Future[None],
) -> tuple[Ending, bool]:
    """Run the socket's two jobs until one of them, or a restart or an overflow, ends; then
    cancel the jobs. What ended first, and whether the client had left; the exception of a
    job that raised one.

    Two tasks per socket, and two futures for the signals (no task each): an idle socket's
    memory is mostly its tasks and queues (docs/benchmarks.md)."""
    awaited = (sender, receiver, restart, overflow)
    jobs = (sender, receiver)
    try:
        done, _ = await asyncio.wait(awaited, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for job in jobs:
            job.cancel()
        # Bounded: a job that ignores its cancellation must not keep the socket's handler alive.
        _, stuck = await asyncio.wait(jobs, timeout=CLOSE_TIMEOUT_S)
        if stuck:
            log.error("%d socket job(s) ignored cancellation: %s", len(stuck), stuck)
    first = next(f for f in awaited if f in done)
    if first in jobs:
        first.result()
    gone = (
        receiver.done()
        and not receiver.cancelled()
        and receiver.exception() is None
        and receiver.result()
    )
    return Ending(awaited.index(first)), gone


async def _send_all(client: Client, feed: Feed) -> None:
    """Send the feed's frames until it ends, awaiting what it asks for between them (`step`)."""
    send, step = client.send, feed.step
    while (got := step()) is not None:
        await (send(got) if isinstance(got, str) else got)


async def _receive_all(
    client: Client, feed: Feed, service: ChatService, session: str, ip: str
) -> bool:
    """Handle client frames until the client leaves (True) or has been silent for
    WS_IDLE_TIMEOUT_S (False: a peer that neither speaks nor pings is taken for dead). A
    WebSocket pong (the answer to the server's pings) or ping counts as speaking."""
    settings = service.settings
    max_chars = settings.max_message_chars
    idle_s = settings.ws_idle_timeout_s or math.inf
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(loop.time() + idle_s)
    pace = Pace(settings.ws_frames_per_s, loop.time())
    refusals = Refusals(session)
    try:
        while True:
            raw = await client.receive()
            if raw is not None:
                watchdog.pause()  # only the client's silence counts, not our work on its frame
                await _handle(raw, feed, service, session, ip, max_chars, refusals)
                if wait_s := pace.wait_s(loop.time()):
                    if not pace.held:
                        pace.held = True
                        metrics.PACED_SOCKETS.inc()
                        log.info(
                            "session %s…: its client sends more than %g frames/s: read no faster",
                            session[:6],
                            settings.ws_frames_per_s,
                        )
                    await asyncio.sleep(wait_s)
            watchdog.move_to(loop.time() + idle_s)
    except ClientGone:
        return True
    except asyncio.CancelledError:
        if watchdog.expired():
            return False
        raise
    finally:
        watchdog.cancel()
        refusals.close()


class Pace:
    """How fast a socket's client frames are read: `per_s` a second, after a burst of as many.
    Past that the reader waits before it takes the next frame, so Hypercorn's bounded queue of
    received frames fills, Hypercorn stops reading the connection and TCP holds the client
    back: a client flooding frames costs the instance what `per_s` frames cost, not a core, and
    nothing it sent is dropped (docs/security.md). 0: no bound."""

    __slots__ = ("_at", "_per_s", "_tokens", "held")

    def __init__(self, per_s: float, now: float) -> None:
        self._per_s = per_s
        self._tokens = max(per_s, 1.0)
        self._at = now
        self.held = False  # once the client has been held back (logged once a socket)

    def wait_s(self, now: float) -> float:
        """A frame was read at `now`: how long to wait before reading the next one."""
        if not self._per_s:
            return 0.0
        self._tokens = min(max(self._per_s, 1.0), self._tokens + (now - self._at) * self._per_s)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self._per_s


class Refusals:
    """A socket's refused frames in the log: the first LOGGED_REFUSALS a line each, the rest
    counted by code into one line when the socket ends, so a client that sends bad frames on
    purpose cannot fill the log (every one is in `chatbot_refused_frames_total`)."""

    __slots__ = ("_logged", "_serious", "_session", "_unlogged")

    def __init__(self, session: str) -> None:
        self._session = session
        self._logged = 0
        self._unlogged: dict[str, int] | None = None
        self._serious = False

    def note(self, code: str, serious: bool, exc: ChatbotError) -> None:
        metrics.REFUSED_FRAMES.labels(code=code).inc()
        if self._logged < LOGGED_REFUSALS:
            self._logged += 1
            level = logging.WARNING if serious else logging.INFO
            log.log(level, "session %s…: %s: %s", self._session[:6], code, exc)
            return
        if self._unlogged is None:
            self._unlogged = {}
        self._unlogged[code] = self._unlogged.get(code, 0) + 1
        self._serious = self._serious or serious

    def close(self) -> None:
        if self._unlogged:
            log.log(
                logging.WARNING if self._serious else logging.INFO,
                "session %s…: %d more refused frames not logged one by one (%s)",
                self._session[:6],
                sum(self._unlogged.values()),
                ", ".join(f"{code} {n}" for code, n in sorted(self._unlogged.items())),
            )


async def _handle(
    raw: str | bytes,
    feed: Feed,
    service: ChatService,
    session: str,
    ip: str,
    max_chars: int,
    refusals: Refusals,
) -> None:
    """One client frame: answered, acted on, or refused with an error frame."""
    frame: protocol.ClientFrame | None = None
    try:
        frame = protocol.parse_client_frame(raw, max_chars=max_chars)
        if isinstance(frame, protocol.Ping):
            feed.push_local(protocol.PONG)
        elif isinstance(frame, protocol.Stop):
            await service.stop(session)
        else:
            await service.submit(session, frame.text, frame.id, client_ip=ip)
    except ChatbotError as exc:
        ref = frame.id if isinstance(frame, protocol.SendMessage) else None
        answer = refusal(exc, ref=ref)
        refusals.note(answer.code, answer.serious, exc)
        feed.push_local(protocol.encode(protocol.refusal(answer)))
        if isinstance(exc, SessionExpired):
            feed.end()  # the sender sends the error, then the socket closes
            await asyncio.Event().wait()  # until the sender, done, ends the socket


def origin_allowed(
    origin: str | None, host: str | None, allowed: tuple[str, ...], scheme: str = "http"
) -> bool:
    """Cross-site WebSocket hijacking guard. Browsers always send Origin; other clients may not.

    Same-origin is always allowed; other origins only when listed in ALLOWED_ORIGINS (or "*").
    Same origin means an `http` or `https` page of the same host and port, and never an `http`
    page when the socket came over TLS (`scheme` "https": a page anyone on the network can
    rewrite). An `https` page on a plain socket is its own host's, behind a proxy that ended TLS.
    """
    if origin is None or "*" in allowed:
        return True
    if origin.rstrip("/") in allowed:
        return True
    parts = urlsplit(origin)
    page_scheme = parts.scheme.lower()
    if page_scheme not in ("http", "https") or (scheme == "https" and page_scheme == "http"):
        return False
    return bool(host) and parts.netloc.lower() == str(host).lower()


def _socket_scheme(socket_scheme: str, forwarded_proto: str | None) -> str:
    """`https` when the socket came over TLS: `wss`, or a trusted proxy's X-Forwarded-Proto (its
    last entry) says so; else `http`."""
    if forwarded_proto and forwarded_proto.split(",")[-1].strip().lower() == "https":
        return "https"
    return "https" if socket_scheme == "wss" else "http"
