"""ACCESS_TOKEN: an optional shared secret that guards the chat endpoints of a private deployment.

Browsers cannot set headers on a WebSocket, so `/ws` also takes it as `?token=`; HTTP clients send
`Authorization: Bearer <token>`. The page, the static files and the health endpoints stay open.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from quart import current_app, request

from ..app import chat_service, settings
from ..chat.limits import client_ip
from ..errors import RateLimited

log = logging.getLogger(__name__)


def token_ok(expected: str | None, headers: Mapping[str, str], args: Mapping[str, str]) -> bool:
    """True when no token is configured, or the request carries it (compared in constant time)."""
    if not expected:
        return True
    scheme, _, credentials = headers.get("Authorization", "").partition(" ")
    offered = credentials.strip() if scheme.lower() == "bearer" else args.get("token", "")
    return hmac.compare_digest(offered.encode(), expected.encode())


JsonReply = tuple[dict[str, Any], int] | tuple[dict[str, Any], int, dict[str, str]]


async def access_refusal(*, limit: bool) -> JsonReply | None:
    """The current request's 401 without ACCESS_TOKEN, or (with `limit`) its 429 over
    RATE_LIMIT_IP, where one request counts as one message of its address; None to go on."""
    config = settings()
    if not token_ok(config.access_token, request.headers, request.args):
        log.warning("refused %s %s without a valid access token", request.method, request.path)
        return {"error": "a valid access token is required"}, 401, {"WWW-Authenticate": "Bearer"}
    if limit:
        try:
            await chat_service().limits.check_message(None, request_ip())
        except RateLimited as exc:
            return too_many(exc)
    return None


def request_ip() -> str:
    """The current request's client address (behind TRUSTED_PROXY_HOPS proxies)."""
    forwarded = request.headers.getlist("X-Forwarded-For")
    return client_ip(request.remote_addr, forwarded, settings().trusted_proxy_hops)


def too_many(exc: RateLimited) -> JsonReply:
    log.warning("refused %s %s: %s", request.method, request.path, exc.message)
    return {"error": exc.message}, 429, {"Retry-After": str(exc.retry_after_s)}


def protected(view: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Guard a route of your own as chatbot guards `POST /chat`: ACCESS_TOKEN when one is set
    (`Authorization: Bearer` or `?token=`) and RATE_LIMIT_IP per client address (401 / 429 with
    a JSON `error`). Works on `async def` and plain `def` views::

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
