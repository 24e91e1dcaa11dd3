"""Credentials: ACCESS_TOKEN (an optional shared secret that guards the chat endpoints of a
private deployment) and, on `/ws`, the session id (the capability to a conversation).

HTTP clients send `Authorization: Bearer <token>`. Browsers cannot set headers on a WebSocket,
but they can offer subprotocols, and the `Sec-WebSocket-Protocol` header is not in the URL that
balancers and routers log: `/ws` takes both credentials there (`socket_credentials`), and
still from the query string (`?token=`, `?session=`), which those logs record. The page, the
static files and the health endpoints stay open.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from quart import current_app, request
from werkzeug.datastructures import Headers

from ..chat.limits import client_ip
from ..errors import CANNOT_ACCEPT, ChatbotError, FrameError, RateLimited, refusal
from ..runtime import runtime

log = logging.getLogger(__name__)

# Offered by a client that speaks this protocol; the server answers it.
SUBPROTOCOL = "chatbot.v1"
SESSION_PREFIX = "chatbot.session."
# Followed by the token in unpadded base64url: a subprotocol is an HTTP token, and an
# ACCESS_TOKEN may hold characters that one cannot.
TOKEN_PREFIX = "chatbot.token."


def token_ok(
    expected: str | None, headers: Headers | Mapping[str, str], offered: str | None = None
) -> bool:
    """True when no token is configured, or the request carries it: in `Authorization: Bearer`,
    or as `offered` (from the query string or a subprotocol). Compared in constant time."""
    if not expected:
        return True
    scheme, _, credentials = headers.get("Authorization", "").partition(" ")
    candidates = [credentials.strip()] if scheme.lower() == "bearer" else []
    candidates += [offered] if offered is not None else []
    return any(hmac.compare_digest(c.encode(), expected.encode()) for c in candidates)


JsonReply = tuple[dict[str, Any], int] | tuple[dict[str, Any], int, dict[str, str]]


async def access_refusal(*, limit: bool) -> JsonReply | None:
    """The current request's 401 without ACCESS_TOKEN, or (with `limit`) its 429 over
    RATE_LIMIT_IP, where one request counts as one message of its address; None to go on."""
    config = runtime().settings
    # `?token=` too (documented as logged, in docs/protocol.md): `protected` routes take it.
    if not token_ok(config.access_token, request.headers, request.args.get("token")):
        log.warning("refused %s %s without a valid access token", request.method, request.path)
        return {"error": "a valid access token is required"}, 401, {"WWW-Authenticate": "Bearer"}
    if limit:
        try:
            await runtime().service.limits.check_message(None, request_ip())
        except RateLimited as exc:
            return refused(exc)
    return None


def request_ip() -> str:
    """The current request's client address (behind TRUSTED_PROXY_HOPS proxies)."""
    forwarded = request.headers.getlist("X-Forwarded-For")
    return client_ip(request.remote_addr, forwarded, runtime().settings.trusted_proxy_hops)


def refused(exc: ChatbotError, unavailable: str = CANNOT_ACCEPT) -> JsonReply:
    """The current request's answer to `exc` (`errors.STATUSES`), logged; `unavailable` says
    what a `BrokerUnavailable` prevented."""
    answer = refusal(exc, unavailable=unavailable)
    level = logging.WARNING if answer.serious else logging.INFO
    log.log(level, "refused %s %s: %s", request.method, request.path, answer.message)
    return {"error": answer.message}, answer.status, answer.headers


def protected(view: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Guard a route of your own as chatbot guards `POST /chat`: ACCESS_TOKEN when one is set
    (`Authorization: Bearer`, or `?token=`, which access logs record) and RATE_LIMIT_IP per
    client address (401 / 429 with a JSON `error`). Works on `async def` and plain `def` views::

        from chatbot import protected

        @blueprint.post("/summarise")
        @protected
        async def summarise(): ...
    """
    return _guarded(view, limit=True)


def token_required(view: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """ACCESS_TOKEN only; for a view that counts its own requests against the limits."""
    return _guarded(view, limit=False)


def _guarded(view: Callable[..., Any], *, limit: bool) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(view)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        refused = await access_refusal(limit=limit)
        if refused is not None:
            return refused
        return await current_app.ensure_async(view)(*args, **kwargs)

    return guarded


@dataclass(frozen=True, slots=True)
class SocketCredentials:
    """What a `/ws` handshake carries: the session asked for, the access token offered, and the
    subprotocol to answer (None when the client offered none)."""

    session: str | None
    token: str | None
    subprotocol: str | None


def socket_credentials(subprotocols: Sequence[str], args: Mapping[str, str]) -> SocketCredentials:
    """The handshake's credentials, from its subprotocols first, then from its query string.
    `FrameError` (a 400) when the client offers subprotocols but not ours, or a token that is
    not base64url."""
    session = args.get("session") or None
    token = args.get("token")
    if subprotocols and SUBPROTOCOL not in subprotocols:
        raise FrameError(
            f"unsupported subprotocol(s) {', '.join(subprotocols)[:100]!r}: "
            f"offer {SUBPROTOCOL!r} (with {SESSION_PREFIX}ID and {TOKEN_PREFIX}BASE64URL)"
        )
    for offered in subprotocols:
        if offered.startswith(SESSION_PREFIX):
            session = offered.removeprefix(SESSION_PREFIX) or None
        elif offered.startswith(TOKEN_PREFIX):
            token = _unbase64url(offered.removeprefix(TOKEN_PREFIX))
    return SocketCredentials(session, token, SUBPROTOCOL if subprotocols else None)


def _unbase64url(text: str) -> str:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, ValueError):
        raise FrameError(f"expected {TOKEN_PREFIX} to be followed by base64url") from None
