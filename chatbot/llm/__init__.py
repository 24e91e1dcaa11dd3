"""The language model behind the chat: a provider (OpenAI or any compatible server, or the
offline demo) behind one resilience layer (retries, deadlines, circuit breaker)."""

from __future__ import annotations

from ..settings import Settings
from .base import ChatModel, Message, Provider, Reply
from .breaker import CircuitBreaker
from .resilient import ResilientModel

__all__ = ["ChatModel", "Message", "Reply", "open_model"]


def open_model(settings: Settings) -> ResilientModel:
    """The demo provider when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set, else OpenAI's,
    with the UPSTREAM_* deadlines, retries and breaker."""
    provider: Provider
    if settings.demo:
        from .demo import DemoProvider

        provider = DemoProvider(word_delay_s=settings.demo_word_delay_s)
    else:
        from .openai import OpenAIProvider

        provider = OpenAIProvider(settings)
    return ResilientModel(
        provider,
        first_token_timeout_s=settings.upstream_first_token_timeout_s,
        idle_timeout_s=settings.upstream_idle_timeout_s,
        max_retries=settings.upstream_max_retries,
        breaker=CircuitBreaker(
            settings.upstream_breaker_failures, settings.upstream_breaker_cooldown_s
        ),
    )
