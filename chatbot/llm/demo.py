"""The offline demo provider: answers without any network, at a human pace, and says what it is.

It goes through the same resilience layer as a model service (`open_model`): it never fails, so
its breaker stays closed, and its pace (`DEMO_WORD_DELAY_S`) is far inside the deadlines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from .base import Deadlines, Message

FIRST_TOKEN_DELAY_S = 0.3


class DemoStream:
    def __init__(self, text: str, word_delay_s: float) -> None:
        self._text = text
        self._word_delay_s = word_delay_s
        self.finish_reason: str | None = None

    async def pieces(self, deadlines: Deadlines) -> AsyncIterator[str]:
        with deadlines:
            await asyncio.sleep(FIRST_TOKEN_DELAY_S if self._word_delay_s else 0)
            for index, word in enumerate(self._text.split(" ")):
                deadlines.arrived()
                yield word if index == 0 else " " + word
                deadlines.waiting()
                await asyncio.sleep(self._word_delay_s)
            self.finish_reason = "stop"

    async def close(self) -> None:
        return None


class DemoProvider:
    """Streams a fixed, clearly labelled answer that quotes the user's last message."""

    name = "demo"
    demo = True

    def __init__(self, word_delay_s: float = 0.06) -> None:
        self._word_delay_s = word_delay_s
        self.closed = False

    async def open(self, messages: Sequence[Message]) -> DemoStream:
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        turns = sum(1 for m in messages if m["role"] == "user")
        quoted = last if len(last) <= 200 else last[:200] + "…"
        text = (
            f"(Demo mode: no model is configured, so this is a canned reply.) "
            f"You said: “{quoted}”. This is message {turns} of our conversation. "
            "Set OPENAI_API_KEY, or OPENAI_BASE_URL for an OpenAI-compatible server, "
            "to chat with a real model."
        )
        return DemoStream(text, self._word_delay_s)

    async def close(self) -> None:
        self.closed = True
