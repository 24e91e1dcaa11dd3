"""How `chatbot serve` runs Python's cyclic garbage collector: short young collections, survivors
frozen, a full collection on a clock.

Every collection stops the whole process, so its pause lands on every socket's next frame. A
collection's pause grows with the objects it scans, and what a server at steady load scans is
almost all alive: at steady N=1,000 the young collections found no garbage at all, the middle
ones none or a few dozen objects out of 70,000-160,000 scanned in 36-96 ms of CPU each, and
once Hypercorn's closed connections stopped being reference cycles (chatbot/patches/hypercorn.py)
a full collection found none either (docs/benchmarks.md, "The GC"). So:

- a young collection runs every `YOUNG_INTERVAL_S`, and every `YOUNG_THRESHOLD` net allocations
  between two ticks, so its scan of what was born since the last one stays short. The
  threshold alone does not bound it: Python counts allocations *minus frees*, and under churn
  the frees of frozen objects (closed sockets') cancel new allocations, so at steady N=1,000
  the young generation held up to 40,000 objects (28 ms of CPU) when the count reached
  5,000. The clock bounds it by time instead (docs/benchmarks.md, "The GC");
- what survives it is frozen (`gc.freeze()`): the objects of sockets and replies that live on
  are never scanned again by middle and full collections, which made the long pauses;
- every `FULL_INTERVAL_S` everything is unfrozen and collected once, so a reference cycle that
  became garbage after it was frozen waits at most that long. Each such collection is logged
  with what it freed and how long it took: that pause (~250 ms of CPU over ~400,000 objects at
  steady N=1,000) is the price of the policy, paid once per interval instead of whenever the
  middle generation fills.

Objects freed by reference counting (almost all of them) are freed at once, frozen or not.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 5_000
# The middle and old generations stay empty (their survivors are frozen); their thresholds only
# say how often a collection scans them too, which then costs no more than a young one.
THRESHOLDS = (YOUNG_THRESHOLD, 10, 10)
FULL_INTERVAL_S = 600.0
YOUNG_INTERVAL_S = 0.05


def _freeze_survivors(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop":
        gc.freeze()  # moves lists: O(1), whatever the number of survivors


def install() -> None:
    """Collect and freeze what start-up built, then collect young objects only and freeze what
    survives them."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)


def uninstall() -> None:
    """Back to Python's own policy (tests)."""
    if _freeze_survivors in gc.callbacks:
        gc.callbacks.remove(_freeze_survivors)
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)


def full_collection() -> int:
    """Unfreeze, collect everything, freeze what is left; the number of objects freed."""
    started = time.perf_counter()
    gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    log.info(
        "garbage collector: full collection freed %d objects in %.0f ms; %d objects kept",
        freed,
        (time.perf_counter() - started) * 1000,
        gc.get_freeze_count(),
    )
    return freed


class YoungClock:
    """A young collection every `interval_s` on the event loop: a timer callback, no task."""

    def __init__(self, interval_s: float = YOUNG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        gc.collect(0)
        self.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def run_collections(
    full_interval_s: float = FULL_INTERVAL_S, young_interval_s: float = YOUNG_INTERVAL_S
) -> AsyncGenerator[None, None]:
    """A Quart `while_serving` hook: a young collection every `young_interval_s` and a full one
    every `full_interval_s` while serving."""

    async def every_interval() -> None:
        while True:
            await asyncio.sleep(full_interval_s)
            full_collection()

    young = YoungClock(young_interval_s)
    young.start()
    task = asyncio.create_task(every_interval(), name="full-collections")
    try:
        yield
    finally:
        young.stop()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
