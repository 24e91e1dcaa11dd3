"""The `limits` library's storages: the in-process one's sweep paced and its methods called
without error wrappers, the Redis one's sliding-window scripts run by the caller (the broker's
pipelined batches)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from types import MethodType
from typing import Any, Final

from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.storage import base as storage_base
from limits.aio.storage.redis.redispy import RedispyBridge

from . import changed

# sha256 (first 16 hex digits) of the limits 5.8.0 source these rely on: the in-process storage
# (whose every call schedules the sweep through its private hook), and the Redis bridge's
# registration and calls of the two sliding-window scripts.
FINGERPRINTS: Final = {
    "limits MemoryStorage": "4fa7eab674390e74",
    "limits _wrap_errors": "2283ba5d5691e484",
    "limits RedispyBridge.register_scripts": "cb180d21d673ea32",
    "limits RedispyBridge.get_sliding_window": "18ea4e91826ea2a0",
    "limits RedispyBridge.acquire_sliding_window_entry": "3b05653089adf5ba",
}
# The scripts of the Redis bridge that `batch_sliding_window_scripts` hands to the batches.
BATCHED_SCRIPTS: Final = ("lua_sliding_window", "lua_acquire_sliding_window")


def _upstream() -> dict[str, Any]:
    return {
        "limits MemoryStorage": MemoryStorage,
        "limits _wrap_errors": storage_base._wrap_errors,
        "limits RedispyBridge.register_scripts": RedispyBridge.register_scripts,
        "limits RedispyBridge.get_sliding_window": RedispyBridge.get_sliding_window,
        "limits RedispyBridge.acquire_sliding_window_entry": (
            RedispyBridge.acquire_sliding_window_entry
        ),
    }


def changed_upstream() -> list[str]:
    return changed(FINGERPRINTS, _upstream)


SWEEP_INTERVAL_S: Final = 10.0  # of the in-process storage's expired keys
# The storage methods `limits` wraps to turn a backend's errors into its StorageError.
WRAPPED_METHODS: Final = (
    "incr",
    "get",
    "get_expiry",
    "check",
    "reset",
    "clear",
    "acquire_entry",
    "get_moving_window",
    "acquire_sliding_window_entry",
    "get_sliding_window",
    "clear_sliding_window",
)


def paced_memory_storage() -> MemoryStorage:
    """`limits`' in-process storage, with its sweep of expired keys paced.

    Its every call starts a sweep of *all* keys (as soon as the previous one has ended), which
    made the sweep O(sessions) per message: 4 % of the CPU at 700 concurrent sessions
    (docs/benchmarks.md). Reads already drop an expired key when they meet it, so the sweep
    only reclaims the memory of keys nobody reads again: once per SWEEP_INTERVAL_S is plenty.

    The hook is replaced on the instance, not in a subclass: `limits` wraps the storage
    methods again in every subclass (`Storage.__init_subclass__`), and each layer is another
    coroutine per call, five calls per reply.
    """
    storage = MemoryStorage()
    sweep = storage._MemoryStorage__schedule_expiry  # type: ignore[attr-defined]
    next_sweep = 0.0

    async def paced() -> None:
        nonlocal next_sweep
        now = time.monotonic()
        if now >= next_sweep:
            next_sweep = now + SWEEP_INTERVAL_S
            await sweep()

    storage._MemoryStorage__schedule_expiry = paced  # type: ignore[attr-defined]
    _unwrap_errors(storage)
    return storage


async def _any() -> None:
    """(Only wrapped, to know the wrapper's code.)"""


_WRAPPER: Final = storage_base._wrap_errors(_any).__code__


def _unwrap_errors(storage: MemoryStorage) -> None:
    """`storage`'s methods without `limits`' error wrappers, on the instance.

    `limits` wraps every storage method in a coroutine (`_wrap_errors`) that turns the backend's
    errors into its StorageError when `wrap_exceptions` is set, once for every class that
    declares the method (twice for the sliding window's): a coroutine and ~20 bytecodes per
    call, 36 calls per reply. The in-process storage has no backend to fail and is made without
    `wrap_exceptions`, where the wrapper only re-raises what it caught."""
    if storage.wrap_exceptions:
        return
    for name in WRAPPED_METHODS:
        method = getattr(type(storage), name)
        while method.__code__ is _WRAPPER:
            method = method.__wrapped__
        setattr(storage, name, MethodType(method, storage))


ScriptRunner = Callable[[Sequence[str], Sequence[Any]], Awaitable[Any]]


def batch_sliding_window_scripts(
    storage: RedisStorage, batched: Callable[[Any], ScriptRunner]
) -> None:
    """Run the sliding-window scripts of `storage`'s bridge through `batched(script)` (given a
    redis-py `Script`, a coroutine function of `(keys, args)`, as the bridge calls each)."""
    for name in BATCHED_SCRIPTS:
        setattr(storage.bridge, name, batched(getattr(storage.bridge, name)))
