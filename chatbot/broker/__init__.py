"""Shared state and messaging between instances: the interface and its backends."""

from __future__ import annotations

from ..settings import Settings
from .base import GONE, NEW_EPOCH, RESYNC, Broker, Event, Hub, Lease, Subscription, cancelling

__all__ = [
    "GONE",
    "NEW_EPOCH",
    "RESYNC",
    "Broker",
    "Event",
    "Hub",
    "Lease",
    "Subscription",
    "cancelling",
    "open_broker",
]


def open_broker(settings: Settings) -> Broker:
    """The backend `REDIS_URL` names (imported lazily), or the in-process one without it."""
    if settings.broker_shared:
        from .redis import RedisBroker

        return RedisBroker(settings)
    from .memory import MemoryBroker

    return MemoryBroker(
        history_turns=settings.history_turns,
        log_max_events=settings.session_log_max_events,
        session_ttl_s=settings.session_ttl_s,
    )
