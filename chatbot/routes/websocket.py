"""`/ws`: one chat socket. A reader and a sender task per socket, the first to end ends both."""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import suppress
from urllib.parse import urlsplit

from quart import Blueprint, abort, websocket

from .. import logs, metrics, protocol
from ..app import chat_service, closing, settings
from ..chat.feed import Feed
from ..chat.limits import client_ip
from ..chat.service import ChatService
from ..errors import BrokerUnavailable, ClientError, RateLimited, SessionExpired
from ..protocol import CloseCode
from ..watchdog import Watchdog
from .access import token_ok

log = logging.getLogger(__name__)

blueprint = Blueprint("websocket", __name__)

# Bound on closing a socket and on stopping its jobs: a stalled peer or a stuck job lets go.
CLOSE_TIMEOUT_S = 2.0


@blueprint.websocket("/ws")
async def chat_socket() -> None:
    config = settings()
    origin = websocket.headers.get("Origin")
    if not origin_allowed(origin, websocket.headers.get("Host"), config.allowed_origins):
        log.warning("refused websocket from origin %r", origin)
        abort(403)
    if not token_ok(config.access_token, websocket.headers, websocket.args):
        log.warning("refused websocket without a valid access token")
        abort(401)
    after_arg = websocket.args.get("after")
    if after_arg is not None and not (
        after_arg.isascii() and after_arg.isdigit() and len(after_arg) < 19
    ):
        log.info("refused websocket with after=%r", after_arg[:20])
        abort(400)
    service = chat_service()
    if closing().is_set():
        abort(503)  # restarting: the client reconnects, through the balancer, elsewhere
    ip = client_ip(websocket.remote_addr, websocket.headers, config.trusted_proxy_hops)
    try:
        async with service.limits.socket(ip):
            session, last = await service.open_session(websocket.args.get("session"))
            # Without `after` the socket starts live; `after` past the log's end means the end.
            after = last if after_arg is None else min(int(after_arg), last)
            logs.bind_session(session)
            metrics.socket_connected(resumed=after_arg is not None)
            await _serve(service, session, last, after, ip)
    except RateLimited as exc:
        log.warning("refused websocket: %s", exc.message)
        abort(429)
    except BrokerUnavailable:
        abort(503)


async def _serve(service: ChatService, session: str, last: int, after: int, ip: str) -> None:
    await websocket.accept()
    metrics.SOCKETS_OPEN.inc()
    try:
        await websocket.send(
            protocol.encode(protocol.ready(session, last, service.model.name, service.model.demo))
        )
        async with service.feed(session, after) as feed:
            with closing().watch() as restart:
                ended = await _first_to_end(
                    asyncio.ensure_future(_send_all(feed)),
                    asyncio.ensure_future(_receive_all(feed, service, session, ip)),
                    restart,
                    feed.overflowed,
                )
        if ended == 1:
            log.info("session %s…: closing a socket silent for too long", session[:6])
            await _close(CloseCode.POLICY_VIOLATION, "idle: send a ping")
        elif ended == 2:
            await _close(CloseCode.SERVICE_RESTART, "service restart")
        elif ended == 3:
            metrics.SLOW_READER_CLOSES.inc()
            log.warning("session %s…: closing a socket that stopped reading", session[:6])
            await _close(CloseCode.TRY_AGAIN_LATER, "too slow: reconnect and resume with after")
    except asyncio.CancelledError:
        raise  # the client went away; Quart cancels the handler
    except Exception:
        log.exception("websocket for session %s… failed", session[:6])
        await _close(CloseCode.INTERNAL_ERROR, "internal error")
    finally:
        metrics.SOCKETS_OPEN.dec()


async def _close(code: CloseCode, reason: str) -> None:
    """Close with `code`; a client that stopped reading may not take the close frame either,
    so after CLOSE_TIMEOUT_S let go (the connection ends when the handler returns)."""
    with suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await websocket.close(code, reason)


async def _first_to_end(
    sender: asyncio.Task[None],
    receiver: asyncio.Task[None],
    restart: asyncio.Future[None],
    overflow: asyncio.Future[None],
) -> int:
    """Run the socket's two jobs until one of them, or a restart or an overflow, ends; then
    cancel the jobs. The index of what ended first; the exception of a job that raised one.

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
    return awaited.index(first)


async def _send_all(feed: Feed) -> None:
    send = websocket._get_current_object().send  # not a context-local lookup per frame
    async for frame in feed:
        await send(frame)


async def _receive_all(feed: Feed, service: ChatService, session: str, ip: str) -> None:
    """Handle client frames until the client has been silent for WS_IDLE_TIMEOUT_S (then return:
    a peer that neither speaks nor pings is taken for dead; Hypercorn's pings get no say, as it
    never checks their pongs)."""
    max_chars = settings().max_message_chars
    idle_s = settings().ws_idle_timeout_s or math.inf
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(loop.time() + idle_s)
    try:
        while True:
            raw = await websocket.receive()
            watchdog.pause()  # only the client's silence counts, not our work on its frame
            await _handle(raw, feed, service, session, ip, max_chars)
            watchdog.move_to(loop.time() + idle_s)
    except asyncio.CancelledError:
        if watchdog.expired():
            return
        raise
    finally:
        watchdog.cancel()


async def _handle(
    raw: str | bytes | None, feed: Feed, service: ChatService, session: str, ip: str, max_chars: int
) -> None:
    """One client frame: answered, acted on, or refused with an error frame."""
    if raw is None:  # an empty binary frame: Quart reads `bytes or text` (quart/asgi.py)
        raw = b""
    frame: protocol.ClientFrame | None = None
    try:
        frame = protocol.parse_client_frame(raw, max_chars=max_chars)
        if isinstance(frame, protocol.Ping):
            feed.push_local(protocol.PONG)
        elif isinstance(frame, protocol.Stop):
            await service.stop(session)
        else:
            await service.submit(session, frame.text, frame.id, client_ip=ip)
    except SessionExpired as exc:
        log.info("session %s… expired under an open socket", session[:6])
        feed.push_local(protocol.encode(protocol.refusal(exc)))
        feed.end()  # the sender sends the error, then the socket closes
        await asyncio.Event().wait()  # until the sender, done, ends the socket
    except ClientError as exc:
        log.info("session %s…: %s: %s", session[:6], exc.code, exc.message)
        feed.push_local(protocol.encode(protocol.refusal(exc)))
    except BrokerUnavailable:
        log.warning("session %s…: broker unavailable, message refused", session[:6])
        ref = frame.id if isinstance(frame, protocol.SendMessage) else None
        message = "The service cannot accept messages right now; try again."
        feed.push_local(protocol.encode(protocol.error("unavailable", message, ref)))


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Cross-site WebSocket hijacking guard. Browsers always send Origin; other clients may not.

    Same-origin is always allowed; other origins only when listed in ALLOWED_ORIGINS (or "*").
    """
    if origin is None or "*" in allowed:
        return True
    if origin.rstrip("/") in allowed:
        return True
    return bool(host) and urlsplit(origin).netloc.lower() == str(host).lower()
