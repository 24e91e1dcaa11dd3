"""Streaming chat completions from OpenAI or any server that speaks its wire format.

One `AsyncOpenAI` client per process: it pools HTTP connections for every reply. The SDK retries
connection errors and 408/409/429/5xx before a stream starts (safe: nothing was shown yet); an
error once tokens flow ends the reply instead.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import openai

from ..errors import UpstreamError
from ..settings import Settings
from .base import Message

log = logging.getLogger(__name__)

# Local OpenAI-compatible servers (Ollama, vLLM, LM Studio) need no key, but the SDK insists on one.
NO_KEY = "not-needed"


class OpenAIReply:
    def __init__(self, stream: openai.AsyncStream[Any]) -> None:
        self._stream = stream
        self.finish_reason: str | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for chunk in self._stream:
                if not chunk.choices:  # the usage chunk carries no choices
                    continue
                choice = chunk.choices[0]
                if choice.delta is not None and choice.delta.content:
                    yield choice.delta.content
                if choice.finish_reason:
                    self.finish_reason = choice.finish_reason
        except openai.APIError as exc:
            raise upstream_error(exc) from exc
        except ValueError as exc:  # a malformed SSE event: the JSON decoder gives up
            raise UpstreamError(
                "upstream_malformed", "The model service sent a reply we could not read."
            ) from exc
        if self.finish_reason is None:
            raise UpstreamError(
                "upstream_incomplete", "The model service ended the reply before finishing it."
            )


class OpenAIModel:
    demo = False

    def __init__(self, settings: Settings) -> None:
        self.name = settings.openai_model
        self._client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key or NO_KEY,
            base_url=settings.openai_base_url,
            timeout=settings.upstream_timeout_s,
        )

    @asynccontextmanager
    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[OpenAIReply]:
        try:
            stream = await self._client.chat.completions.create(
                model=self.name,
                messages=list(messages),
                stream=True,  # type: ignore[arg-type]
            )
        except openai.APIError as exc:
            raise upstream_error(exc) from exc
        try:
            yield OpenAIReply(stream)
        finally:
            # Closing the response ends the upstream HTTP request now (stop, disconnect, error),
            # instead of letting it generate tokens nobody reads.
            await stream.close()

    async def close(self) -> None:
        await self._client.close()


def upstream_error(exc: openai.APIError) -> UpstreamError:
    """Translate an SDK error into words a user can read. Never echoes the SDK's message, which
    may quote request details; never contains the API key."""
    if isinstance(exc, openai.APITimeoutError):
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
        retry_after = exc.response.headers.get("retry-after")
        hint = f" Try again in {retry_after} s." if retry_after else " Try again shortly."
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
