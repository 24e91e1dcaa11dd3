"""Every change chatbot makes to its dependencies' internals, and the guard that keeps them true.

- `hypercorn`: Hypercorn's WebSocket stream and wsproto's frame decoder (frame size, deflate
  bombs, close frames, pings, reference cycles);
- `limits`: the in-process storage's sweep, paced, and its methods unwrapped; the Redis
  storage's sliding-window scripts run in the broker's pipelined batches;
- `redis`: commands packed by hiredis on asyncio connections; the batches' direct use of a
  connection's streams; the asyncio cluster client's `ASKING` on the redirected command's
  connection.

Each module names, in its FINGERPRINTS, the upstream source each patch replaces or relies on,
as read when it was written. `verify()` (called by `chatbot serve` before it serves) refuses to
start on a version whose source no longer matches, so an upgrade cannot silently undo or break a
patch; tests/test_patches.py fails on it, naming the function that moved.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Final

MODULES: Final = ("hypercorn", "limits", "redis")


class UnsupportedUpstream(RuntimeError):
    """A dependency changed where chatbot patches it."""


def fingerprint(function: Any) -> str:
    """sha256 (first 16 hex digits) of the source of `function` (or class)."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def changed(
    fingerprints: Mapping[str, str], upstream: Callable[[], Mapping[str, Any]]
) -> list[str]:
    """The names in `fingerprints` whose upstream source (`upstream()`, by name) no longer
    matches."""
    return [name for name, fn in upstream().items() if fingerprint(fn) != fingerprints[name]]


def changed_upstream() -> list[str]:
    """Every patched or relied-on upstream function whose source changed, of every module."""
    names: list[str] = []
    for module in MODULES:
        names += importlib.import_module(f"{__name__}.{module}").changed_upstream()
    return names


def verify() -> None:
    """`UnsupportedUpstream` unless every patch matches the installed dependencies."""
    if names := changed_upstream():
        raise UnsupportedUpstream(
            f"chatbot/patches/ was written for other versions of its dependencies; these changed "
            f"since: {', '.join(names)}. Pin the old versions or review the patches."
        )
