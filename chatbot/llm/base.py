"""What the conversation logic needs of a language model (`ChatModel`: a cancellable stream of
text), and what a provider gives the resilience layer that makes one (`Provider`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
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

    @property
    def finish_reason(self) -> str | None: ...

    def __aiter__(self) -> AsyncIterator[str]: ...


class ChatModel(Protocol):
    name: str
    demo: bool

    def stream(self, messages: Sequence[Message]) -> AbstractAsyncContextManager[Reply]:
        """Start a reply. Leaving the context closes it, stopping the upstream request at once."""

    def upstream_status(self) -> BreakerStatus:
        """How this process sees the model service (its circuit breaker), for `/readyz`."""

    async def close(self) -> None: ...


# A provider: one model service's wire format, and nothing else. The resilience layer
# (`resilient.py`) wraps any provider with the retries, the deadlines and the circuit breaker,
# and is the `ChatModel` the rest of the service sees.


class Deadlines(Protocol):
    """The reply's deadlines, as a provider's stream reports to them. The clock runs while the
    stream waits on the service (the first-token deadline, then the idle one) and stops while
    the caller holds a piece; a missed deadline cancels the waiting stream, and leaving the
    `with` block turns that cancellation into an `UpstreamError` (`upstream_timeout`).

        with deadlines:
            while data := await read():
                ...
                deadlines.arrived()
                yield text
                deadlines.waiting()
    """

    def arrived(self) -> None:
        """A piece came: the clock stops (the first piece tells the breaker the service is up)."""

    def waiting(self) -> None:
        """The caller wants the next piece: the idle deadline runs from now."""

    def __enter__(self) -> None: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Stream(Protocol):
    """One reply a provider has started: the service answered and is sending it."""

    @property
    def finish_reason(self) -> str | None:
        """Why the service ended the reply (`stop`, `length`), once it has."""

    def pieces(self, deadlines: Deadlines) -> AsyncIterator[str]:
        """The reply's text pieces as they arrive, never empty, reported to `deadlines`. Raises
        `UpstreamError` when the service fails mid-reply (never retried: words were seen)."""

    async def close(self) -> None:
        """Let go of the reply, finished or not; an unfinished one stops the service's work."""


class Provider(Protocol):
    """Opens one streamed reply of a model service and classifies its failures."""

    name: str  # the model, as `ready` frames and `/readyz` name it
    demo: bool  # the offline stand-in, not a model service

    async def open(self, messages: Sequence[Message]) -> Stream:
        """Send one request. Raises `UpstreamError`, with `retryable`, `retry_in_s` and `status`
        as the service's answer says; never retries itself."""

    async def close(self) -> None: ...
