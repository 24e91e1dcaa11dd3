"""The offline demo model: answers without any network, at a human pace, and says what it is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from .base import Message
from .breaker import BreakerStatus

FIRST_TOKEN_DELAY_S = 0.3


class DemoReply:
    def __init__(self, text: str, word_delay_s: float) -> None:
        self._text = text
        self._word_delay_s = word_delay_s
        self.finish_reason: str | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        await asyncio.sleep(FIRST_TOKEN_DELAY_S if self._word_delay_s else 0)
        for index, word in enumerate(self._text.split(" ")):
            yield word if index == 0 else " " + word
            await asyncio.sleep(self._word_delay_s)
        self.finish_reason = "stop"


class DemoModel:
    """Streams a fixed, clearly labelled answer that quotes the user's last message."""

    name = "demo"
    demo = True

    def __init__(self, word_delay_s: float = 0.06) -> None:
        self._word_delay_s = word_delay_s

    @asynccontextmanager
    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[DemoReply]:
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        turns = sum(1 for m in messages if m["role"] == "user")
        quoted = last if len(last) <= 200 else last[:200] + "…"
        text = (
            f"(Demo mode: no model is configured, so this is a canned reply.) "
            f"You said: “{quoted}”. This is message {turns} of our conversation. "
            "Set OPENAI_API_KEY, or OPENAI_BASE_URL for an OpenAI-compatible server, "
            "to chat with a real model."
        )
        yield DemoReply(text, self._word_delay_s)

    def upstream_status(self) -> BreakerStatus:
        return {"breaker": "closed", "consecutive_failures": 0}  # no service to fail

    async def close(self) -> None:
        return None
