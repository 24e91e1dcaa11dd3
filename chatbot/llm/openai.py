"""Streaming chat completions from OpenAI or any server that speaks its wire format.

One `AsyncOpenAI` client per process, on the SDK's aiohttp transport: it pools HTTP connections
for every reply. The SDK builds, authenticates and sends the request; the reply's server-sent
events are read from the raw bytes here. Every wait on the model service has its own deadline:
connecting (`UPSTREAM_CONNECT_TIMEOUT_S`), the first content piece
(`UPSTREAM_FIRST_TOKEN_TIMEOUT_S`, counted from the request and covering retries) and each piece
after it (`UPSTREAM_IDLE_TIMEOUT_S`).

Retries happen here, not in the SDK (whose own are switched off), because only here is the
first-token deadline known: connection errors, timeouts, 408/409/429 and 5xx are retried up to
`UPSTREAM_MAX_RETRIES` times with the SDK's backoff or the server's `Retry-After`, and never
when the wait would outlast the deadline. Nothing is retried once a stream has started: the user
may already have seen its first words. A `CircuitBreaker` stops calling a service that is down.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import openai

from ..errors import UpstreamError
from ..settings import Settings
from ..watchdog import Watchdog
from .base import Message
from .breaker import BreakerStatus, CircuitBreaker

log = logging.getLogger(__name__)

# Local OpenAI-compatible servers (Ollama, vLLM, LM Studio) need no key, but the SDK insists on one.
NO_KEY = "not-needed"

# The SDK's retry policy (openai/_base_client.py: `_should_retry`, `_calculate_retry_timeout`).
RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx
BACKOFF_S = (0.5, 8.0)  # first and longest wait between attempts, less up to 25 % jitter
MAX_RETRY_AFTER_S = 120.0  # a server asking for a longer wait is not retried at all

# Failures that say the service is down (or drowning), which the circuit breaker counts. An HTTP
# 4xx answer says it is up; a malformed or unfinished stream says nothing either way.
DOWN = frozenset(
    {"upstream_timeout", "upstream_unreachable", "upstream_unavailable", "upstream_rate_limited"}
)
ANSWERED = frozenset({"upstream_auth", "upstream_rejected"})

ONE_SHOT_CONNECTIONS = 100  # upstream connections beyond MAX_GENERATIONS, for POST /chat

# What the SDK's own `chat.completions.create()` passes to `post()`: the API key as a bearer
# token. A token stream is never compressed: that would hold tokens back in the compressor.
REQUEST_OPTIONS: Any = {
    "security": {"bearer_auth": True},
    "headers": {"Accept-Encoding": "identity"},
}


class OpenAIReply:
    """A started stream. Iterating yields content pieces, each within its deadline.

    The server-sent events are parsed here from the raw bytes: building the SDK's pydantic model
    for every chunk costs ~10x the CPU of decoding the JSON (docs/benchmarks.md), and a relay
    needs two fields of it. One watchdog timer per reply enforces the deadlines; arming a fresh
    timeout around every chunk cost more than the parsing.
    """

    def __init__(
        self,
        response: httpx2.Response,
        *,
        first_token_at: float,
        first_token_timeout_s: float,
        idle_timeout_s: float,
        on_first_token: Callable[[], None],
    ) -> None:
        self._response = response
        self._first_token_at = first_token_at  # loop time by which the first piece must come
        self._first_token_timeout_s = first_token_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._on_first_token = on_first_token
        self.finish_reason: str | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        watchdog = Watchdog(self._first_token_at)
        started = False
        pending = b""  # an unfinished line
        ended = False
        try:
            async for data in self._response.aiter_bytes():
                lines = (pending + data).splitlines(keepends=True)
                pending = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, `event:` lines
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        ended = True
                        break
                    content, finish_reason = _delta_of(json.loads(payload))
                    if finish_reason:
                        self.finish_reason = finish_reason
                    if content:
                        if not started:
                            started = True
                            self._on_first_token()
                        # The deadline covers only the wait for the service, never our
                        # consumer's work (which may ride out a broker outage).
                        watchdog.pause()
                        yield content
                        watchdog.move_to(loop.time() + self._idle_timeout_s)
                if ended:
                    break
        except asyncio.CancelledError:
            if watchdog.expired():
                raise (
                    idle_timeout(self._idle_timeout_s)
                    if started
                    else first_token_timeout(self._first_token_timeout_s)
                ) from None
            raise
        except httpx2.TransportError as exc:  # the connection broke or timed out mid-stream
            raise UpstreamError(
                "upstream_unreachable", "The connection to the model service broke mid-reply."
            ) from exc
        except ValueError as exc:  # an event that is not JSON, or not a completion chunk
            raise UpstreamError(
                "upstream_malformed", "The model service sent a reply we could not read."
            ) from exc
        finally:
            watchdog.cancel()
        if self.finish_reason is None:
            raise UpstreamError(
                "upstream_incomplete", "The model service ended the reply before finishing it."
            )


def _delta_of(chunk: Any) -> tuple[str | None, str | None]:
    """(content, finish_reason) of one `chat.completion.chunk` event; ValueError if it is none."""
    if not isinstance(chunk, dict):
        raise ValueError("a stream event that is not a JSON object")
    if chunk.get("error"):
        raise UpstreamError("upstream_error", "The model service failed mid-reply. Try again.")
    choices = chunk.get("choices")
    if not choices:  # the usage chunk carries no choices
        return None, None
    choice = choices[0]
    delta = choice.get("delta") or {}
    content = delta.get("content")
    return (content if isinstance(content, str) else None), choice.get("finish_reason")


class OpenAIModel:
    demo = False

    def __init__(self, settings: Settings) -> None:
        self.name = settings.openai_model
        self._first_token_timeout_s = settings.upstream_first_token_timeout_s
        self._idle_timeout_s = settings.upstream_idle_timeout_s
        self._max_retries = settings.upstream_max_retries
        self.breaker = CircuitBreaker(
            settings.upstream_breaker_failures, settings.upstream_breaker_cooldown_s
        )
        # Our deadlines bound every wait (the first-token deadline the request, the watchdog
        # the stream), so the transport gets only the connect timeout: a read timeout made
        # aiohttp re-arm a timer for every chunk it received.
        self._client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key or NO_KEY,
            base_url=settings.openai_base_url,
            timeout=openai.Timeout(None, connect=settings.upstream_connect_timeout_s),
            max_retries=0,
            # aiohttp under the SDK: its C-accelerated HTTP reads cost half of httpx2's
            # default transport per reply (bench/upstream_cpu.py). Every admitted reply holds
            # one connection for its stream; POST /chat (not admitted) gets some headroom.
            http_client=openai.DefaultAioHttpClient(
                limits=httpx2.Limits(
                    max_connections=settings.max_generations + ONE_SHOT_CONNECTIONS,
                    max_keepalive_connections=settings.max_generations + ONE_SHOT_CONNECTIONS,
                )
            ),
        )

    def upstream_status(self) -> BreakerStatus:
        return self.breaker.status()

    @asynccontextmanager
    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[OpenAIReply]:
        with self.breaker.attempt() as attempt:  # raises CircuitOpen: no call at all
            first_token_at = asyncio.get_running_loop().time() + self._first_token_timeout_s
            try:
                response = await self._open(list(messages), first_token_at)
                try:
                    yield OpenAIReply(
                        response,
                        first_token_at=first_token_at,
                        first_token_timeout_s=self._first_token_timeout_s,
                        idle_timeout_s=self._idle_timeout_s,
                        on_first_token=attempt.succeeded,
                    )
                finally:
                    # Closing the response ends the upstream HTTP request now (stop, disconnect,
                    # timeout, error), instead of letting it generate tokens nobody reads.
                    await response.aclose()
            except UpstreamError as exc:
                if exc.code in DOWN:
                    attempt.failed()
                elif exc.code in ANSWERED:
                    attempt.succeeded()
                raise

    async def _open(self, messages: list[Message], first_token_at: float) -> httpx2.Response:
        """Send the request, retrying what is safe to retry while the first-token deadline
        allows."""
        loop = asyncio.get_running_loop()
        # The body goes as it is: `messages` holds plain role/content strings already checked
        # by us, and the SDK's TypedDict transform of `create()` cost ~1.9 ms per request.
        body = {"model": self.name, "messages": messages, "stream": True}
        retries = 0
        while True:
            try:
                async with asyncio.timeout_at(first_token_at):
                    # Raises the SDK's status errors; the caller closes the response.
                    return await self._client.post(
                        "/chat/completions",
                        body=body,
                        cast_to=httpx2.Response,
                        options=REQUEST_OPTIONS,
                        stream=True,
                        stream_cls=openai.AsyncStream[object],
                    )
            except TimeoutError:
                raise first_token_timeout(self._first_token_timeout_s) from None
            except openai.APIError as exc:
                wait_s = retry_wait_s(exc, retries) if retries < self._max_retries else None
                if wait_s is None or loop.time() + wait_s >= first_token_at:
                    raise upstream_error(exc) from exc
                retries += 1
                log.info(
                    "model service: %s; retry %d of %d in %.2f s",
                    _describe(exc),
                    retries,
                    self._max_retries,
                    wait_s,
                )
                await asyncio.sleep(wait_s)

    async def close(self) -> None:
        await self._client.close()


def retry_wait_s(exc: openai.APIError, retries_taken: int) -> float | None:
    """How long to wait before retrying after `exc`, or None when it must not be retried."""
    if isinstance(exc, openai.APIStatusError):
        headers = exc.response.headers
        verdict = headers.get("x-should-retry")  # OpenAI's own hint wins, as in the SDK
        if verdict == "false" or (
            verdict != "true" and exc.status_code not in RETRY_STATUSES and exc.status_code < 500
        ):
            return None
        after_s = retry_after_s(headers)
        if after_s is not None:
            return after_s if after_s <= MAX_RETRY_AFTER_S else None
    elif not isinstance(exc, openai.APIConnectionError):  # e.g. a response that fails validation
        return None
    first, longest = BACKOFF_S
    return min(first * 2.0**retries_taken, longest) * random.uniform(0.75, 1.0)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms`, or `retry-after` in seconds or as
    an HTTP date. None when absent or unreadable."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    date = headers.get("retry-after")
    if date is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(date)
        return None if parsed is None else max(email.utils.mktime_tz(parsed) - time.time(), 0.0)
    except (TypeError, ValueError, OverflowError):
        return None


def first_token_timeout(timeout_s: float) -> UpstreamError:
    return UpstreamError(
        "upstream_timeout", f"The model service did not start answering within {timeout_s:g} s."
    )


def idle_timeout(timeout_s: float) -> UpstreamError:
    return UpstreamError(
        "upstream_timeout", f"The model service stopped answering for {timeout_s:g} s mid-reply."
    )


def upstream_error(exc: openai.APIError) -> UpstreamError:
    """Translate an SDK error into words a user can read. Never echoes the SDK's message, which
    may quote request details; never contains the API key."""
    if isinstance(exc, openai.APITimeoutError) and not _refused(exc):
        return UpstreamError("upstream_timeout", "The model service took too long to answer.")
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamError("upstream_unreachable", "The model service cannot be reached.")
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return UpstreamError(
            "upstream_auth",
            "The model service refused our credentials; the operator must fix the API key.",
            retryable=False,
        )
    if isinstance(exc, openai.RateLimitError):
        after_s = retry_after_s(exc.response.headers)
        hint = (
            f" Try again in {max(math.ceil(after_s), 1)} s."
            if after_s is not None
            else " Try again shortly."
        )
        return UpstreamError(
            "upstream_rate_limited", "The model service is rate limiting us." + hint
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status >= 500:
            return UpstreamError(
                "upstream_unavailable", f"The model service failed (HTTP {status}). Try again."
            )
        return UpstreamError(
            "upstream_rejected",
            f"The model service rejected the request (HTTP {status}).",
            retryable=False,
        )
    return UpstreamError("upstream_error", "The model service failed mid-reply. Try again.")


def _refused(exc: BaseException) -> bool:
    """Whether a connection failure was an error (refused, reset, no route) rather than a
    timeout. The SDK's aiohttp transport reports every `ClientConnectionError` as a connect
    timeout; the OSError behind it tells the truth."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _describe(exc: openai.APIError) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    return type(exc).__name__
