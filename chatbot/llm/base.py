"""What the conversation logic needs of a language model: a cancellable stream of text."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypedDict

from .breaker import BreakerStatus


class Message(TypedDict):
    role: str
    content: str


class Reply(Protocol):
    """One streaming reply: iterate for text pieces; `finish_reason` is set once it has ended.

    Iteration raises `UpstreamError` when the model service fails.
    """

    finish_reason: str | None

    def __aiter__(self) -> AsyncIterator[str]: ...


class ChatModel(Protocol):
    name: str
    demo: bool

    def stream(self, messages: Sequence[Message]) -> AbstractAsyncContextManager[Reply]:
        """Start a reply. Leaving the context closes it, stopping the upstream request at once."""

    def upstream_status(self) -> BreakerStatus:
        """How this process sees the model service (its circuit breaker), for `/readyz`."""

    async def close(self) -> None: ...
