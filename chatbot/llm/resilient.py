"""Model resilience, for any provider: retries, deadlines and a circuit breaker.

A `Provider` knows one model service's wire format: it opens one streamed reply and says what
a failure was (`UpstreamError`: `retryable`, the service's `Retry-After`). `ResilientModel` is
the `ChatModel` the rest of the service sees, the same for every provider:

- Every wait on the service has a deadline: the first content piece (`first_token_timeout_s`,
  counted from the request and covering retries), then each piece after it (`idle_timeout_s`).
  The caller's time with a piece is not counted.
- A retryable failure to open the reply is retried up to `max_retries` times, after the
  service's `Retry-After` or a backoff (the OpenAI SDK's policy), and never when the wait would
  outlast the first-token deadline. Nothing is retried once the reply has started: the user may
  already have seen its first words.
- A `CircuitBreaker` stops calling a service that is down.

A reply's pieces come straight from the provider's iterator: one watchdog timer per reply
keeps the deadlines, moved by the stream as it goes (`Deadlines`), with no layer in between
(arming a fresh timeout around every piece cost more than parsing it).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType

from ..errors import UpstreamError
from ..watchdog import Watchdog
from .base import Message, Provider, Stream
from .breaker import Attempt, BreakerStatus, CircuitBreaker

log = logging.getLogger(__name__)

# The OpenAI SDK's retry policy (openai/_base_client.py: `_calculate_retry_timeout`).
BACKOFF_S = (0.5, 8.0)  # first and longest wait between attempts, less up to 25 % jitter
MAX_RETRY_AFTER_S = 120.0  # a service asking for a longer wait is not retried at all

# Failures that say the service is down (or drowning), which the circuit breaker counts. An
# answer that refuses the request says it is up; a malformed or unfinished stream says nothing
# either way.
DOWN = frozenset(
    {"upstream_timeout", "upstream_unreachable", "upstream_unavailable", "upstream_rate_limited"}
)
ANSWERED = frozenset({"upstream_auth", "upstream_rejected"})


class ResilientModel:
    """`provider` as a `ChatModel`: its replies within deadlines, retried before their first
    piece, behind `breaker`."""

    def __init__(
        self,
        provider: Provider,
        *,
        first_token_timeout_s: float,
        idle_timeout_s: float,
        max_retries: int,
        breaker: CircuitBreaker,
    ) -> None:
        self.provider = provider
        self.name = provider.name
        self.demo = provider.demo
        self.breaker = breaker
        self._first_token_timeout_s = first_token_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._max_retries = max_retries

    def upstream_status(self) -> BreakerStatus:
        return self.breaker.status()

    @asynccontextmanager
    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[ResilientReply]:
        with self.breaker.attempt() as attempt:  # raises CircuitOpen: no call at all
            first_token_at = asyncio.get_running_loop().time() + self._first_token_timeout_s
            # One deadline keeper for the whole reply: the first token's deadline covers the
            # request and its retries, then each piece moves it.
            watchdog = Watchdog(first_token_at)
            try:
                try:
                    stream = await self._open(messages, first_token_at)
                except asyncio.CancelledError:
                    if watchdog.expired():
                        raise first_token_timeout(self._first_token_timeout_s) from None
                    raise
                deadlines = _Deadlines(
                    watchdog, attempt, self._first_token_timeout_s, self._idle_timeout_s
                )
                try:
                    yield ResilientReply(stream, deadlines)
                finally:
                    watchdog.cancel()  # letting go is not waiting on the service
                    await stream.close()
            except UpstreamError as exc:
                if exc.code in DOWN:
                    attempt.failed()
                elif exc.code in ANSWERED:
                    attempt.succeeded()
                raise
            finally:
                watchdog.cancel()

    async def _open(self, messages: Sequence[Message], first_token_at: float) -> Stream:
        """Open the reply, retrying what is safe to retry while the first-token deadline
        allows. The caller's watchdog holds that deadline over this."""
        loop = asyncio.get_running_loop()
        retries = 0
        while True:
            try:
                return await self.provider.open(messages)
            except UpstreamError as exc:
                wait_s = retry_wait_s(exc, retries) if retries < self._max_retries else None
                if wait_s is None or loop.time() + wait_s >= first_token_at:
                    raise
                retries += 1
                log.info(
                    "model service: %s; retry %d of %d in %.2f s",
                    f"HTTP {exc.status}" if exc.status else type(exc.__cause__ or exc).__name__,
                    retries,
                    self._max_retries,
                    wait_s,
                )
            await asyncio.sleep(wait_s)

    async def close(self) -> None:
        await self.provider.close()


class ResilientReply:
    """A started reply. Iterating it is iterating the provider's pieces themselves."""

    __slots__ = ("_deadlines", "_stream")

    def __init__(self, stream: Stream, deadlines: _Deadlines) -> None:
        self._stream = stream
        self._deadlines = deadlines

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason

    def __aiter__(self) -> AsyncIterator[str]:
        return self._stream.pieces(self._deadlines)


class _Deadlines:
    """The `Deadlines` of one reply, kept by its watchdog (see the protocol)."""

    __slots__ = (
        "_attempt",
        "_first_token_timeout_s",
        "_idle_timeout_s",
        "_loop",
        "_started",
        "_watchdog",
    )

    def __init__(
        self,
        watchdog: Watchdog,
        attempt: Attempt,
        first_token_timeout_s: float,
        idle_timeout_s: float,
    ) -> None:
        self._watchdog = watchdog  # holds the first-token deadline until the first piece
        self._attempt = attempt
        self._first_token_timeout_s = first_token_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._loop = asyncio.get_running_loop()
        self._started = False

    def arrived(self) -> None:
        if not self._started:
            self._started = True
            self._attempt.succeeded()
        # The deadline covers only the wait for the service, never our consumer's work (which
        # may ride out a broker outage).
        self._watchdog.pause()

    def waiting(self) -> None:
        self._watchdog.move_to(self._loop.time() + self._idle_timeout_s)

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._watchdog.pause()  # the stream is over: closing it is not waiting on the service
        if exc_type is asyncio.CancelledError and self._watchdog.expired():
            raise (
                idle_timeout(self._idle_timeout_s)
                if self._started
                else first_token_timeout(self._first_token_timeout_s)
            ) from None


def retry_wait_s(error: UpstreamError, retries_taken: int) -> float | None:
    """How long to wait before retrying a request that failed with `error`, or None when it
    must not be retried."""
    if not error.retryable:
        return None
    if error.retry_in_s is not None:
        return error.retry_in_s if error.retry_in_s <= MAX_RETRY_AFTER_S else None
    first, longest = BACKOFF_S
    return min(first * 2.0**retries_taken, longest) * random.uniform(0.75, 1.0)


def first_token_timeout(timeout_s: float) -> UpstreamError:
    return UpstreamError(
        "upstream_timeout", f"The model service did not start answering within {timeout_s:g} s."
    )


def idle_timeout(timeout_s: float) -> UpstreamError:
    return UpstreamError(
        "upstream_timeout", f"The model service stopped answering for {timeout_s:g} s mid-reply."
    )
