"""Prometheus metrics of the service, served at `GET /metrics` in the text exposition format.

Every metric object lives here, created once at import in the process-wide default registry
(creating the app again, as tests do, never registers anything twice). The rest of the code
counts with one-line calls. Gauges that are state, not events (replies streaming and queued,
broker reconnects), are read from the running `ChatService`s at scrape time instead of being
kept in step by hand.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, get_args

from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .protocol import DoneReason

if TYPE_CHECKING:
    from .chat.service import ChatService

# The classic text format that `generate_latest` writes and every Prometheus reads. (Newer
# clients label it "version=1.0.0" in CONTENT_TYPE_LATEST, but answer plain scrapers with this.)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A `_created` timestamp series beside every counter doubles the output for nothing we use.
disable_created_metrics()

SOCKETS_OPEN = Gauge("chatbot_websockets_open", "WebSockets open on this instance.")
DESCRIPTORS_EXHAUSTED = Gauge(
    "chatbot_descriptors_exhausted",
    "1 while this process has (nearly) no file descriptor left: new connections are refused.",
)
DESCRIPTOR_EXHAUSTIONS = Counter(
    "chatbot_descriptors_exhaustions_total",
    "Times this process ran (nearly) out of file descriptors.",
)
SOCKETS_CONNECTED = Counter(
    "chatbot_websockets_connected_total", "WebSockets that passed the checks and got a session."
)
SESSIONS_OPENED = Counter(
    "chatbot_sessions_opened_total", "New chat sessions created (by a socket or the ask API)."
)
RESUMES = Counter(
    "chatbot_resumes_total", "Sockets that connected with `after` to resume a session's events."
)
TIME_TO_FIRST_DELTA = Histogram(
    "chatbot_time_to_first_delta_seconds",
    "Seconds from accepting a message (queue wait included) to its reply's first delta.",
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0),
)
REPLY_DELTAS = Counter("chatbot_reply_deltas_total", "Reply deltas (text pieces) streamed.")
DELTAS_PER_SECOND = Histogram(
    "chatbot_reply_deltas_per_second",
    "Streaming rate of one reply: deltas per second from its first delta to its end.",
    buckets=(1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 500, 1000),
)
REPLIES_FINISHED = Counter(
    "chatbot_replies_finished_total",
    "Replies closed by this instance, by the reason in their `done` frame.",
    ["reason"],
)
UPSTREAM_ERRORS = Counter(
    "chatbot_upstream_errors_total",
    "Failures of the model service, by the error code clients see (upstream_*).",
    ["code"],
)
CANARY_LAG = Histogram(
    "chatbot_pubsub_canary_lag_seconds",
    "Redis pub/sub round trip of this instance's canary: publish to local dispatch.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RATE_LIMITED = Counter(
    "chatbot_rate_limited_total",
    "Requests refused by a rate limit, by the limit's scope.",
    ["scope"],
)
REFUSED_FRAMES = Counter(
    "chatbot_refused_frames_total",
    "Client frames on sockets answered with an `error` frame, by its code.",
    ["code"],
)
PACED_SOCKETS = Counter(
    "chatbot_paced_sockets_total",
    "Sockets whose client sent frames faster than WS_FRAMES_PER_S, read no faster from then on.",
)
SLOW_READER_CLOSES = Counter(
    "chatbot_slow_reader_closes_total",
    "Sockets closed with 1013 because their client fell too far behind reading.",
)
OVERLOADED = Counter(
    "chatbot_overloaded_total",
    "Messages refused with `overloaded`: every reply slot and queue place was taken.",
)

GC_PAUSE = Histogram(
    "chatbot_gc_pause_seconds",
    "Pauses of Python's cyclic garbage collector (wall clock), by the generation collected: "
    "every socket of the process waits them out.",
    ["generation"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
GC_PAUSE_MAX = Gauge(
    "chatbot_gc_pause_max_seconds",
    "Longest collector pause since start, by generation; `clock=cpu` is the CPU the collection "
    "took, which other programs on the machine cannot lengthen.",
    ["generation", "clock"],
)

for _reason in get_args(DoneReason):
    REPLIES_FINISHED.labels(reason=_reason)  # every reason is exported, at 0 until it happens


def rate_limited(scope: str) -> None:
    """Count one refusal by the rate limit of `scope` (e.g. "session", "ip", "sockets")."""
    RATE_LIMITED.labels(scope=scope).inc()


def upstream_error(code: str) -> None:
    """Count one failure of the model service by its `UpstreamError.code`."""
    UPSTREAM_ERRORS.labels(code=code).inc()


def socket_connected(*, resumed: bool) -> None:
    """A socket got its session; `resumed`: it asked for the events after a seq (`after`)."""
    SOCKETS_CONNECTED.inc()
    if resumed:
        RESUMES.inc()


def canary_received(sent_at: object) -> None:
    """A canary came back; `sent_at` is the `time.time()` it carries (this process's own clock)."""
    if isinstance(sent_at, int | float) and not isinstance(sent_at, bool):
        CANARY_LAG.observe(max(0.0, time.time() - sent_at))


class ReplyTimer:
    """Follows one reply from the acceptance of its message: first delta, rate and outcome."""

    __slots__ = ("_accepted", "_deltas", "_first")

    def __init__(self) -> None:
        self._accepted = time.monotonic()
        self._first: float | None = None
        self._deltas = 0

    def delta(self) -> None:
        """Call for each delta streamed, before it is stored. (Per token: no clock, no lock.)"""
        if self._first is None:
            self._first = time.monotonic()
            TIME_TO_FIRST_DELTA.observe(self._first - self._accepted)
        self._deltas += 1

    def finished(self, reason: DoneReason) -> None:
        """Call once, as the reply is closed with `reason`."""
        REPLIES_FINISHED.labels(reason=reason).inc()
        REPLY_DELTAS.inc(self._deltas)  # counted as each reply ends, not one lock per token
        if self._first is not None and self._deltas > 1:
            elapsed = time.monotonic() - self._first
            if elapsed > 0:
                DELTAS_PER_SECOND.observe((self._deltas - 1) / elapsed)


class _GCTimer:
    """A `gc.callbacks` entry timing every collection (two clock reads a collection, which
    happen a few times a second at most)."""

    def __init__(self) -> None:
        self._started = (0.0, 0.0)
        self._worst: dict[tuple[int, str], float] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = (time.perf_counter(), time.thread_time())
            return
        wall, cpu = time.perf_counter() - self._started[0], time.thread_time() - self._started[1]
        generation = info["generation"]
        GC_PAUSE.labels(generation=str(generation)).observe(wall)
        for clock, pause in (("wall", wall), ("cpu", cpu)):
            if pause > self._worst.get((generation, clock), -1.0):
                self._worst[generation, clock] = pause
                GC_PAUSE_MAX.labels(generation=str(generation), clock=clock).set(pause)


_gc_timer = _GCTimer()


def time_gc() -> None:
    """Time the collector's pauses from now on (`chatbot serve` calls it once started up)."""
    if _gc_timer not in gc.callbacks:
        gc.callbacks.append(_gc_timer)


class _ServiceCollector:
    """Reads the running services' state at scrape time (summed, should a process run more than
    one, as tests do)."""

    def __init__(self) -> None:
        self.services: weakref.WeakSet[ChatService] = weakref.WeakSet()

    def describe(self) -> Iterable[Metric]:
        return self._families(())

    def collect(self) -> Iterable[Metric]:
        return self._families(list(self.services))

    @staticmethod
    def _families(services: Iterable[ChatService]) -> Iterator[Metric]:
        services = list(services)
        yield GaugeMetricFamily(
            "chatbot_generations_active",
            "Replies streaming from the model on this instance (holding a MAX_GENERATIONS slot).",
            value=sum(s.admission.active for s in services),
        )
        yield GaugeMetricFamily(
            "chatbot_generations_queued",
            "Replies waiting for a slot on this instance (at most MAX_QUEUED_REPLIES).",
            value=sum(s.admission.queued for s in services),
        )
        yield CounterMetricFamily(
            "chatbot_broker_reconnects",
            "Times the Redis pub/sub listener was re-established after a failure.",
            value=sum(s.broker.stats().reconnects for s in services),
        )


_services = _ServiceCollector()
REGISTRY.register(_services)


def watch(service: ChatService) -> None:
    """Export `service`'s state from now on (call when it starts)."""
    _services.services.add(service)


def unwatch(service: ChatService) -> None:
    _services.services.discard(service)


def scrape() -> bytes:
    """Every metric of the process, in the Prometheus text format (`CONTENT_TYPE`)."""
    return generate_latest(REGISTRY)
