"""Shared state and messaging between instances: the interface and its backends.

A backend is one module here and one line in `BACKENDS`: the URL schemes of REDIS_URL it serves.
It is imported only when a URL names it, so the in-process default never loads redis-py. Its class
plays every role of a `Broker` (the module asks mypy to check it, as memory.py does) and leaves
the fan-out to its own sockets to `LocalFanOut`, saying only how a session's events reach it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

from .base import (
    GONE,
    NEW_EPOCH,
    RESYNC,
    Broker,
    BrokerStats,
    Counters,
    Event,
    EventLog,
    FanOut,
    History,
    Lease,
    Leases,
    Lifecycle,
    LocalFanOut,
    Secrets,
    Subscription,
    Tasks,
    cancelling,
    expiry_slack_s,
)

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "BACKENDS",
    "GONE",
    "NEW_EPOCH",
    "RESYNC",
    "Broker",
    "BrokerStats",
    "Counters",
    "Event",
    "EventLog",
    "FanOut",
    "History",
    "Lease",
    "Leases",
    "Lifecycle",
    "LocalFanOut",
    "Secrets",
    "Subscription",
    "Tasks",
    "backend",
    "cancelling",
    "expiry_slack_s",
    "open_broker",
]

# URL scheme -> "module:class" of the backend that serves it (without REDIS_URL: "memory").
BACKENDS: Final = {
    "memory": "chatbot.broker.memory:MemoryBroker",
    "redis": "chatbot.broker.redis:RedisBroker",
    "rediss": "chatbot.broker.redis:RedisBroker",
    "redis+cluster": "chatbot.broker.redis_cluster:RedisClusterBroker",
    "rediss+cluster": "chatbot.broker.redis_cluster:RedisClusterBroker",
}


def backend(url: str | None) -> type[Broker]:
    """The class of the backend `url` names (imported now), the in-process one for None."""
    scheme = url.partition("://")[0].lower() if url else "memory"
    module, _, name = BACKENDS[scheme].partition(":")
    cls: type[Broker] = getattr(importlib.import_module(module), name)
    return cls


def open_broker(settings: Settings) -> Broker:
    """The backend `REDIS_URL` names, or the in-process one without it."""
    return backend(settings.redis_url).from_settings(settings)
