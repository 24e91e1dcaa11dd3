"""chatbot: live LLM chat over WebSockets. Your own app starts from `create_app()` and guards its
routes with `protected` (docs/migrating.md)."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "protected"]


def __getattr__(name: str) -> Any:
    # Lazily, so `python -m chatbot.fake_openai` and the settings do not import the web stack.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "protected":
        from .routes.access import protected

        return protected
    raise AttributeError(name)
