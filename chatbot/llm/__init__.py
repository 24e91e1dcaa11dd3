"""The language model behind the chat: OpenAI (or any compatible server), or the offline demo."""

from __future__ import annotations

from ..settings import Settings
from .base import ChatModel, Message, Reply

__all__ = ["ChatModel", "Message", "Reply", "open_model"]


def open_model(settings: Settings) -> ChatModel:
    """The demo model when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set, else OpenAI's."""
    if settings.demo:
        from .demo import DemoModel

        return DemoModel(word_delay_s=settings.demo_word_delay_s)
    from .openai import OpenAIModel

    return OpenAIModel(settings)
