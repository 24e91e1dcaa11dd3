"""Running out of file descriptors: noticed, logged, and shown in `/readyz` and `/metrics`.

A process without a free descriptor cannot accept a connection. uvloop (libuv) then accepts
each pending one with a descriptor it keeps in reserve and closes it at once, so clients see a
reset, and tells nobody: no error reaches the application or the log. So the process counts its
own open descriptors against its limit (`ulimit -n`), every CHECK_INTERVAL_S and on every
`/readyz`, and calls itself exhausted within RESERVE of the limit: a warning is logged when that
starts and a line when it ends, `/readyz` answers 503 (a balancer routes new users elsewhere),
and `chatbot_descriptors_exhausted` is 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from typing import TypedDict

from . import metrics

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
# Descriptors kept free before calling the process exhausted: a twentieth of the limit, at least
# 16 (Redis and model connections, log files, a /readyz probe).
RESERVE_FRACTION = 0.05
RESERVE_MIN = 16


class Usage(TypedDict):
    open: int
    limit: int
    exhausted: bool


_state = {"exhausted": False}


def check() -> Usage | None:
    """The process's descriptors now, logging when exhaustion starts or ends; None where the
    process cannot count them (no /proc)."""
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return None
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return {"open": used, "limit": -1, "exhausted": False}
    reserve = max(RESERVE_MIN, int(limit * RESERVE_FRACTION))
    exhausted = used >= limit - reserve
    if exhausted and not _state["exhausted"]:
        metrics.DESCRIPTOR_EXHAUSTIONS.inc()
        log.warning(
            "out of file descriptors: %d of %d open; new connections are refused until some "
            "close (raise `ulimit -n`, or lower MAX_SOCKETS_PER_IP)",
            used,
            limit,
        )
    elif _state["exhausted"] and not exhausted:
        log.warning("file descriptors available again: %d of %d open", used, limit)
    _state["exhausted"] = exhausted
    metrics.DESCRIPTORS_EXHAUSTED.set(int(exhausted))
    return {"open": used, "limit": limit, "exhausted": exhausted}


async def watch() -> None:
    """Check every CHECK_INTERVAL_S while serving (the app's `while_serving`)."""
    while True:
        check()
        await asyncio.sleep(CHECK_INTERVAL_S)
