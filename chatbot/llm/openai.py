"""The OpenAI provider: streamed chat completions from OpenAI or any server that speaks its
wire format.

The official SDK's `AsyncOpenAI` client defines the request: the base URL, the API key and the
headers it sends (organisation, project, user agent), all read from settings or its usual
environment variables. Requests go out through one aiohttp session per process, pooling
connections for every reply: aiohttp is the transport the SDK's own `DefaultAioHttpClient` wraps,
used here without the httpx2 layers around it (request and response models, header merging, a
log record per request: 0.3 ms of CPU per reply at steady N=1,000). The per-request machinery of
`chat.completions.create()` (options models, body transform, retries) is bypassed too: it cost
0.27 ms of CPU per request, as much as reading 20 tokens (bench/upstream_cpu.py). The reply's
server-sent events are parsed here from the raw bytes.

Connecting has its own deadline (`UPSTREAM_CONNECT_TIMEOUT_S`). Every failure becomes an
`UpstreamError` that says what the SDK would do with it: connection errors, timeouts, 408/409/429
and 5xx are `retryable`, with the server's `Retry-After`. The retries themselves, the first-token
and idle deadlines and the circuit breaker are the resilience layer's (`resilient.py`).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx2
import openai

from ..errors import UpstreamError
from ..settings import Settings
from .base import Deadlines, Message, TextMender

# Local OpenAI-compatible servers (Ollama, vLLM, LM Studio) need no key, but the SDK insists on one.
NO_KEY = "not-needed"

# What the SDK retries (openai/_base_client.py: `_should_retry`).
RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx

ONE_SHOT_CONNECTIONS = 100  # upstream connections beyond MAX_GENERATIONS, for POST /chat

# A token stream is never compressed: that would hold tokens back in the compressor.
STREAM_HEADERS = {"Accept-Encoding": "identity"}

# How long a finished reply's connection may wait for the end of its HTTP body before it is
# closed instead of pooled: servers that write `[DONE]` and the chunked body's terminator
# apart (LiteLLM's proxy, llama.cpp's server) send the terminator within milliseconds.
BODY_END_WAIT_S = 5.0


class OpenAIStream:
    """A started reply. Its pieces are the content of its events, each as it arrives.

    The pieces that arrived together (one read of the socket) are yielded as one: they become one
    `delta` frame, one log entry, one send per socket. Nothing is held back to wait for more;
    but when the process falls behind, the service's chunks pile up between reads, so an
    overloaded process does less work per token exactly when it must. Short of that it rarely
    happens: at steady N=1,000 a 20-chunk reply went out in 19.8 frames on average.

    The server-sent events are parsed here from the raw bytes: building the SDK's pydantic model
    for every chunk costs ~10x the CPU of decoding the JSON (docs/benchmarks.md), and a relay
    needs two fields of it.
    """

    def __init__(self, response: aiohttp.ClientResponse, provider: OpenAIProvider) -> None:
        self._response = response
        self._provider = provider
        self.finish_reason: str | None = None
        self.finished = False  # the stream said all it had to say (`[DONE]` or its body's end)

    async def pieces(self, deadlines: Deadlines) -> AsyncIterator[str]:
        pending = b""  # an unfinished line
        ended = False
        mend = TextMender()
        with deadlines:
            try:
                body = self._response.content
                while data := await body.readany():  # what has arrived; b"" at the end
                    lines = (pending + data).splitlines(keepends=True)
                    pending = (
                        lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
                    )
                    pieces = []
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue  # blank separators, comments, `event:` lines
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            ended = True
                            break
                        # SSE is UTF-8: decoded here, json.loads skips sniffing the encoding of
                        # bytes (1.2 % of the CPU at steady N=1,000).
                        content, finish_reason = _delta_of(
                            json.loads(payload.decode("utf-8", "surrogatepass"))
                        )
                        if finish_reason:
                            self.finish_reason = finish_reason
                        if content:
                            pieces.append(content)
                    text = mend("".join(pieces))
                    if text:
                        deadlines.arrived()
                        yield text
                        deadlines.waiting()
                    if ended:
                        break
                self.finished = True
                if text := mend.flush():
                    deadlines.arrived()
                    yield text
            except aiohttp.ClientError as exc:  # the connection broke mid-stream
                raise UpstreamError(
                    "upstream_unreachable", "The connection to the model service broke mid-reply."
                ) from exc
            except ValueError as exc:  # an event that is not JSON, or not a completion chunk
                raise UpstreamError(
                    "upstream_malformed", "The model service sent a reply we could not read."
                ) from exc
        if self.finish_reason is None:
            raise UpstreamError(
                "upstream_incomplete", "The model service ended the reply before finishing it."
            )

    async def close(self) -> None:
        self._provider.let_go(self._response, self.finished)


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


class OpenAIProvider:
    """The `Provider` of OpenAI's chat completions (and of servers that speak its wire format)."""

    demo = False

    def __init__(self, settings: Settings) -> None:
        self.name = settings.openai_model
        # The reply's cap, asked of the service (MAX_REPLY_CHARS holds whatever it does).
        self._limits = (
            {"max_tokens": settings.max_reply_tokens} if settings.max_reply_tokens else {}
        )
        # Every admitted reply holds one connection for its stream; POST /chat (not admitted)
        # gets some headroom.
        self._connections = settings.max_generations + ONE_SHOT_CONNECTIONS
        self._connect_timeout_s = settings.upstream_connect_timeout_s
        self._sdk = openai.AsyncOpenAI(
            api_key=settings.openai_api_key or NO_KEY,
            base_url=settings.openai_base_url,
            max_retries=0,
        )
        self._url = str(self._sdk.base_url.join("chat/completions"))
        headers = {**self._sdk.auth_headers, **self._sdk.default_headers, **STREAM_HEADERS}
        # The SDK marks headers it leaves out (no organisation, no project) with `Omit`.
        self._headers = {k: v for k, v in headers.items() if isinstance(v, str)}
        self._session: aiohttp.ClientSession | None = None  # made in the event loop, on first use
        self.finishing = 0  # finished replies whose connection waits for its body's end

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # The SDK's trust store (SSL_CERT_FILE too) and proxy (HTTPS_PROXY, NO_PROXY).
                # aiohttp's own `trust_env` would read the proxy variables again for every
                # request: 0.6 ms of CPU each (bench/upstream_cpu.py).
                connector=aiohttp.TCPConnector(
                    limit=self._connections, ssl=httpx2.create_ssl_context()
                ),
                # The resilience layer's deadlines bound every other wait (one watchdog per
                # reply), so the session gets only the connect timeout: a read timeout re-arms
                # a timer for every chunk.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s),
                headers=self._headers,
                proxy=env_proxy(self._url),
            )
        return self._session

    async def open(self, messages: Sequence[Message]) -> OpenAIStream:
        # `messages` holds plain role/content strings, already checked by us.
        request = {"model": self.name, "messages": list(messages), "stream": True, **self._limits}
        try:
            response = await self._client().post(self._url, data=json.dumps(request).encode())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise connection_error(exc) from exc
        if 200 <= response.status < 300:
            return OpenAIStream(response, self)  # which lets go of it
        self.let_go(response, True)  # its body is never shown to anyone
        raise status_error(response.status, response.headers)

    def let_go(self, response: aiohttp.ClientResponse, finished: bool) -> None:
        """Give up `response`: its connection back to the pool if the reply `finished`, else
        closed, which ends the upstream request now (stop, disconnect, timeout, error) instead
        of letting it generate tokens nobody reads.

        aiohttp pools a connection only once its body has ended; `release()` before that closes
        it, and the next reply pays a new TCP (and TLS) handshake. So a finished reply whose
        body's end is still on its way leaves the connection to aiohttp, which pools it when
        the end arrives (`ClientResponse._response_eof`); one that does not end within
        `BODY_END_WAIT_S` is closed. The user's `done` waits for none of this.
        """
        content = response.content
        if not finished or content.is_eof():
            response.release()
            return
        self.finishing += 1
        settled = False

        def settle() -> None:  # the body's end (the connection is pooled by now) or the deadline
            nonlocal settled
            if not settled:
                settled = True
                self.finishing -= 1
                timer.cancel()
                response.close()  # closes the connection only if it was not pooled

        timer = asyncio.get_running_loop().call_later(BODY_END_WAIT_S, settle)
        content.on_eof(settle)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self._sdk.close()


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


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`)."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def connection_error(exc: aiohttp.ClientError | TimeoutError) -> UpstreamError:
    """A request that got no answer, in words a user can read (never the exception's text,
    which may quote request details)."""
    if isinstance(exc, TimeoutError):  # aiohttp's connect timeouts are TimeoutErrors too
        return UpstreamError("upstream_timeout", "The model service took too long to answer.")
    return UpstreamError("upstream_unreachable", "The model service cannot be reached.")


def status_error(status: int, headers: Mapping[str, str]) -> UpstreamError:
    """An HTTP error answer, in words a user can read. Never echoes the service's error body;
    never contains the API key. `retryable` as the SDK decides to retry (`_should_retry`)."""
    verdict = headers.get("x-should-retry")  # OpenAI's own hint wins, as in the SDK
    retryable = verdict == "true" or (
        verdict != "false" and (status in RETRY_STATUSES or status >= 500)
    )
    after_s = retry_after_s(headers)
    if status in (401, 403):
        code = "upstream_auth"
        message = "The model service refused our credentials; the operator must fix the API key."
    elif status == 429:
        code = "upstream_rate_limited"
        message = "The model service is rate limiting us." + (
            f" Try again in {max(math.ceil(after_s), 1)} s."
            if after_s is not None
            else " Try again shortly."
        )
    elif status >= 500:
        code = "upstream_unavailable"
        message = f"The model service failed (HTTP {status}). Try again."
    else:
        code = "upstream_rejected"
        message = f"The model service rejected the request (HTTP {status})."
    return UpstreamError(code, message, retryable=retryable, retry_in_s=after_s, status=status)
