"""Abuse limits: message rates per session and per client IP, a token budget per session, and
concurrent sockets per IP. Shared by every instance when REDIS_URL is set.

Rates and the budget use the `limits` library's sliding-window counters, in the storage the
broker provides (Redis's runs on the broker's own connections and batches, so it costs no extra
connections or round trips); the socket count is a broker counter. Over a limit nothing
reaches the model: the client gets `rate_limited` with the seconds to wait.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import NoReturn

from limits import RateLimitItem, parse
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from .. import metrics
from ..broker import Counters
from ..errors import BrokerUnavailable, RateLimited
from ..settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "chatbot:limits"
SOCKET_COUNT_TTL_S = 3600  # an address's count, unchanged this long, is forgotten


def client_ip(peer: str | None, forwarded_for: Sequence[str], trusted_hops: int) -> str:
    """The client's address: the peer's, or with `trusted_hops` proxies in front (Heroku's router
    is one), the address the outermost trusted proxy saw. `forwarded_for` holds every
    X-Forwarded-For header line in order: a proxy may append its entry to the last line
    (nginx, Heroku) or add a line of its own (HAProxy), so they are read as one list, and
    counted from the right. Entries further left were written by the client itself and prove
    nothing."""
    if trusted_hops <= 0:
        return peer or "unknown"
    forwarded = [a.strip() for line in forwarded_for for a in line.split(",") if a.strip()]
    if len(forwarded) >= trusted_hops:
        return forwarded[-trusted_hops]
    return forwarded[0] if forwarded else (peer or "unknown")


class AbuseLimits:
    def __init__(self, settings: Settings, broker: Counters) -> None:
        self._settings = settings
        self._broker = broker
        self._per_session = parse(settings.rate_limit_session)
        self._per_ip = parse(settings.rate_limit_ip)
        self._handshakes = parse(settings.rate_limit_handshakes_ip)
        self._budget = parse(settings.session_token_budget)
        self._ip_budget = parse(settings.ip_token_budget)
        self._new_sessions = parse(settings.rate_limit_new_sessions)
        self._limiter = SlidingWindowCounterRateLimiter(broker.rate_limit_storage(KEY_PREFIX))

    async def check_message(self, session: str | None, ip: str) -> None:
        """Count one message; raise `RateLimited` (nothing else happens) when over a limit.

        Without a session (the stateless `POST /chat`) only the IP's rate applies.
        """
        checks = [(self._per_ip, "ip", ip)]
        if session is not None:
            # After the address's: a client over its rate makes no key for the session it
            # names (a stream of made-up session ids would each leave one in Redis).
            checks.append((self._per_session, "session", session))
        for item, scope, key in checks:
            if not await self._limiter.hit(item, scope, key):
                message = f"too many messages from this {scope}: at most {_describe(item)}"
                await self._refuse(item, scope, key, message)
        # The address's budget too: a new session costs one handshake, so a session's budget
        # alone binds nobody who opens another.
        budgets = [(self._ip_budget, "budget_ip", ip, "this address")]
        if session is not None:
            budgets.insert(0, (self._budget, "budget", session, "this session"))
        for item, scope, key, whose in budgets:
            if not await self._limiter.test(item, scope, key):
                message = f"{whose} has used its token budget ({_describe(item)})"
                await self._refuse(item, scope, key, message)

    async def check_handshake(self, ip: str) -> None:
        """Count one WebSocket handshake of `ip`; `RateLimited` over RATE_LIMIT_HANDSHAKES_IP (a
        connect/close loop costs the server a descriptor, a task group and a session lookup
        each time, and no message to limit)."""
        if not await self._limiter.hit(self._handshakes, "handshakes", ip):
            message = (
                f"too many connections from this address: at most {_describe(self._handshakes)}"
            )
            await self._refuse(self._handshakes, "handshakes", ip, message)

    async def check_new_session(self, ip: str) -> None:
        """Count a session stored for `ip` (each keeps its broker memory for SESSION_TTL_S);
        `RateLimited` when over RATE_LIMIT_NEW_SESSIONS."""
        if not await self._limiter.hit(self._new_sessions, "new_session", ip):
            limit = _describe(self._new_sessions)
            message = f"too many new sessions from this address: at most {limit}"
            await self._refuse(self._new_sessions, "new_session", ip, message)

    async def charge_tokens(self, session: str, tokens: int, ip: str | None = None) -> None:
        """Spend a finished reply's tokens from its session's budget and its address's."""
        await self._spend(self._budget, "budget", session, tokens)
        if ip is not None:
            await self._spend(self._ip_budget, "budget_ip", ip, tokens)

    async def _spend(self, item: RateLimitItem, scope: str, key: str, tokens: int) -> None:
        """A window refuses a hit larger than what is left (and spends nothing), so a reply that
        overdraws the budget spends exactly the rest of it: one call while the budget lasts,
        three when it runs out."""
        if tokens <= 0 or await self._limiter.hit(item, scope, key, cost=tokens):
            return
        stats = await self._limiter.get_window_stats(item, scope, key)
        if stats.remaining > 0:
            await self._limiter.hit(item, scope, key, cost=stats.remaining)

    @asynccontextmanager
    async def socket(self, ip: str) -> AsyncIterator[None]:
        """Hold one of the IP's socket places for the block; `RateLimited` when none is left."""
        key = f"{KEY_PREFIX}:sockets:{ip}"
        try:
            # This instance's share of the count, which stops counting if the instance dies.
            count = await self._broker.adjust(key, 1, SOCKET_COUNT_TTL_S)
            if count > self._settings.max_sockets_per_ip:
                metrics.rate_limited("sockets")
                raise RateLimited(
                    f"too many open sockets from this address "
                    f"(at most {self._settings.max_sockets_per_ip})",
                    scope="sockets",
                    retry_after_s=1,
                )
            yield
        finally:
            try:
                await self._broker.adjust(key, -1, SOCKET_COUNT_TTL_S)
            except BrokerUnavailable:  # told to the broker later (Broker.adjust)
                log.warning("could not release a socket place of %s yet", ip)

    async def _refuse(self, item: RateLimitItem, scope: str, key: str, message: str) -> NoReturn:
        """Count the refusal by `scope` and raise it, with the seconds until `item` allows."""
        metrics.rate_limited(scope)
        retry_after_s = await self._retry_after(item, scope, key)
        raise RateLimited(message, scope=scope, retry_after_s=retry_after_s)

    async def _retry_after(self, item: RateLimitItem, *identifiers: str) -> int:
        stats = await self._limiter.get_window_stats(item, *identifiers)
        return max(1, math.ceil(stats.reset_time - time.time()))


def estimate_tokens(*texts: str) -> int:
    """About four characters a token, as OpenAI's tokenizers average for English text."""
    return math.ceil(sum(len(text) for text in texts) / 4)


def _describe(item: RateLimitItem) -> str:
    unit = item.GRANULARITY.name
    per = f"{item.multiples} {unit}s" if item.multiples > 1 else unit
    return f"{item.amount} per {per}"
