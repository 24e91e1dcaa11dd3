"""What the conversation logic needs of a language model: a cancellable stream of text."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypedDict

from .breaker import BreakerStatus


class Message(TypedDict):
    role: str
    content: str


class TextMender:
    """Model text made Unicode as it comes in, piece by piece.

    JSON escapes UTF-16 code units, and a server that cuts its stream between the two halves of a
    surrogate pair (an emoji, say) sends each half alone: "\\ud83d" ends one event and
    "\\ude00" opens the next. Such a half is not Unicode; no UTF-8 encoder takes it, so stored
    or sent, it closed every socket that replayed the reply (1011) and failed every Redis call
    batched with its append (issue #13). A first half that ends a piece waits for the next one;
    halves that meet become their character, and any half left alone becomes U+FFFD."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = ""  # a first half at the end of the last piece

    def __call__(self, text: str) -> str:
        if self._held:
            text, self._held = self._held + text, ""
        if text.isascii():
            return text
        try:
            text.encode()
        except UnicodeEncodeError:
            pass
        else:
            return text
        if "\ud800" <= text[-1] <= "\udbff":
            text, self._held = text[:-1], text[-1]
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")

    def flush(self) -> str:
        """At the stream's end: what is still held, replaced."""
        held, self._held = self._held, ""
        return "\ufffd" if held else ""


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
