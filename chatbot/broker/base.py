"""The broker interface: everything instances share, and the local fan-out every backend uses.

A broker holds each session's replayable event log (with its `seq` counter: `EventLog`), the
history used as model context (`History`), the generation lease (one reply per session at a time,
cluster-wide: `Leases`), the pub/sub that carries live events to sockets and control messages
(`stop`) to the instance that owns a generation (`FanOut`), and the counters of the abuse limits
(`Counters`). Each caller is typed against the roles it uses; `Broker` is all of them.
`MemoryBroker` is the reference implementation; `RedisBroker` shares the same state between
processes.

Locally, each process fans events out to its sockets the same way whatever the backend
(`LocalFanOut`): one subscription per socket, each a bounded queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

from ..errors import BrokerUnavailable
from ..llm.base import Message

if TYPE_CHECKING:
    from limits.aio.storage import Storage

    from ..settings import Settings

log = logging.getLogger(__name__)

SUBSCRIPTION_MAX_BYTES: Final = 1024 * 1024
GONE: Final = "this session is gone (expired, or lost by the server); start a new one"


def expiry_slack_s(ttl_s: float) -> float:
    """How much sooner than `ttl_s` (SESSION_TTL_S) after its last event a session may expire:
    Redis refreshes its TTLs only once they have run down this much, not on every event
    (redis.py, `_append_one`, which computes the same)."""
    return min(1.0, ttl_s / 2)


@dataclass(frozen=True, slots=True)
class Event:
    """One logged conversation event. `frame` is its JSON text, encoded once for every socket."""

    seq: int
    data: dict[str, Any]
    frame: str

    @classmethod
    def from_frame(cls, frame: str) -> Event:
        data = json.loads(frame)
        return cls(seq=data["seq"], data=data, frame=frame)


def take_page(frames: Iterable[str], max_bytes: int | None) -> list[Event]:
    """The events of `frames`, up to the first whose frames reach `max_bytes` characters (at
    least one): a page of `Broker.replay`."""
    events: list[Event] = []
    total = 0
    for frame in frames:
        events.append(Event.from_frame(frame))
        total += len(frame)
        if max_bytes is not None and total >= max_bytes:
            break
    return events


@dataclass(frozen=True, slots=True)
class Lease:
    """Who is generating a reply in a session: the owning instance, the message replied to, and
    a token unique to this holding (so a stale holder can never renew or release a newer one)."""

    owner: str
    msg_id: str
    token: str


class _Marker:
    """A signal to a subscription, queued in order with its frames."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# It may have missed events (the pub/sub listener reconnected): re-read the log.
RESYNC: Final = _Marker("RESYNC")
# The broker's data is not what it was (Redis restarted empty or with older data): the seqs seen
# so far mean nothing now (redis_epoch.py).
NEW_EPOCH: Final = _Marker("NEW_EPOCH")

Item = Event | str | _Marker


def cancelling() -> bool:
    """Whether the current task is being cancelled. redis-py can swallow a cancellation that
    arrives mid-command (it becomes a connection error), so broker code and its callers check
    this before taking an error, or a quiet return, at face value.

    A call, not a task kept in a local: a frame holding its own task, kept alive by the
    CancelledError traceback that the cancelled task keeps, is a reference cycle, and the
    objects of every closed socket would wait for the cyclic GC instead of being freed."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Subscription:
    """The inbox of one consumer (a socket) of one session's live frames, bounded in bytes.

    Overflow policy: the dispatcher never waits for a consumer. When the frames waiting exceed
    `max_bytes` (the consumer stopped reading: a stalled client), further frames are dropped
    and `overflowed` is resolved; the socket is then closed with 1013 and its client resumes
    from the log with `after`, so nothing is lost and no other socket slows down.

    Lists and futures rather than an `asyncio.Queue` and an `asyncio.Event`: an idle socket
    holds one of these, and those two cost ~4 KiB of its memory (docs/benchmarks.md).
    """

    __slots__ = ("_bytes", "_items", "_out", "_waiter", "max_bytes", "overflowed", "session")

    def __init__(self, session: str, max_bytes: int = SUBSCRIPTION_MAX_BYTES) -> None:
        self.session = session
        self.max_bytes = max_bytes
        self.overflowed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A queue as two lists (appended to `_items`, popped from the reversed `_out`): an
        # empty deque costs ~600 bytes, an empty list 56, and an idle socket holds one.
        self._items: list[Item] = []
        self._out: list[Item] = []
        self._waiter: asyncio.Future[None] | None = None
        self._bytes = 0

    def push(self, item: Item) -> None:
        """Deliver without waiting: the dispatcher must never block on one slow consumer."""
        # An event, nearly always: its size without a call.
        size = len(item.frame) if type(item) is Event else _size(item)
        if self._bytes + size > self.max_bytes:
            if not self.overflowed.done():
                self.overflowed.set_result(None)
            return
        self._bytes += size
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def pop(self) -> Item | None:
        """The next item, or None while there is none (`wait` for one)."""
        if not self._out:
            if not self._items:
                return None
            self._items.reverse()
            self._out, self._items = self._items, self._out
        item = self._out.pop()
        self._bytes -= len(item.frame) if type(item) is Event else _size(item)
        return item

    def wait(self) -> asyncio.Future[None]:
        """A future done when an item arrives. A consumer that awaits it and then pops costs
        one future per wait, with no coroutine around it."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    async def get(self) -> Item:
        while (item := self.pop()) is None:
            await self.wait()
        return item

    @property
    def backlog_bytes(self) -> int:
        return self._bytes


def _size(item: Item) -> int:
    if isinstance(item, Event):
        return len(item.frame)
    return len(item) if isinstance(item, str) else 0


class LocalFanOut:
    """Local fan-out, written once: this process's subscriptions by session, and the `subscribe`
    every backend serves. A backend subclasses it and delivers what it logs or announces with
    `_deliver`, what other instances published with `_received`.

    A backend whose events also come from other instances says, in two hooks, what its remote
    fan-out needs when a session gets its first local subscriber (`_join_remote`: start routing
    the session's events here) and when its last one leaves (`_leave_remote`). The in-process
    backend has no remote fan-out and keeps the defaults.
    """

    # How long a subscriber waits for its session's remote fan-out to reach this process.
    join_timeout_s: ClassVar[float] = 5.0

    def __init__(self) -> None:
        self._local: dict[str, set[Subscription]] = {}
        # Per session with local subscribers: the join of its remote fan-out (`_join_remote`),
        # done once the session's events reach this process.
        self._joins: dict[str, asyncio.Future[None]] = {}

    @asynccontextmanager
    async def subscribe(
        self, session: str, max_bytes: int = SUBSCRIPTION_MAX_BYTES
    ) -> AsyncIterator[Subscription]:
        """Live events of `session` from the moment this returns (the subscription is active).
        `BrokerUnavailable` when its remote fan-out does not join within `join_timeout_s`."""
        sub = Subscription(session, max_bytes)
        subs = self._local.setdefault(session, set())
        subs.add(sub)
        try:
            if len(subs) == 1:
                joining = self._join_remote(session)
                if joining is not None:
                    self._joins[session] = joining
            joined = self._joins.get(session)
            if joined is not None:
                try:
                    async with asyncio.timeout(self.join_timeout_s):
                        await asyncio.shield(joined)
                except TimeoutError:
                    raise BrokerUnavailable("the broker did not confirm a subscription") from None
            yield sub
        finally:
            subs.discard(sub)
            if not subs:
                del self._local[session]
                joined = self._joins.pop(session, None)
                if joined is not None:
                    joined.cancel()
                with suppress(BrokerUnavailable):  # the backend forgets it on its own (a TTL)
                    await self._leave_remote(session)

    def _join_remote(self, session: str) -> asyncio.Future[None] | None:
        """`session` has its first local subscriber: start routing its events from other
        instances here. A future done once they are (every subscriber waits for it), or None
        when they already are or there are none."""
        return None

    async def _leave_remote(self, session: str) -> None:
        """The last local subscriber of `session` left: stop routing its events here (after the
        join is cancelled, if it was still running). `BrokerUnavailable` is ignored."""

    def _deliver(self, session: str, item: Item) -> None:
        """Push `item` to every local subscriber of `session`, waiting for none."""
        for sub in self._local.get(session, ()):
            sub.push(item)

    def _received(self, session: str, frame: str) -> None:
        """Deliver a frame another instance published: a logged event when it has a seq, else
        a transient frame (`announce`), passed on as it is."""
        try:
            data = json.loads(frame)
        except ValueError:
            log.error("ignored a malformed frame for session %s…", session[:6])
            return
        seq = data.get("seq") if isinstance(data, dict) else None
        self._deliver(session, frame if seq is None else Event(seq, data, frame))

    def _signal_local(self, marker: _Marker, sessions: Iterable[str] | None = None) -> None:
        """Tell every local subscriber (RESYNC after a pub/sub outage, NEW_EPOCH after data
        loss), or only those of `sessions` (a backend with several pub/sub links resyncs the
        sessions of the one that came back)."""
        local = self._local
        for session in local if sessions is None else sessions:
            for sub in local.get(session, ()):
                sub.push(marker)

    def _local_sessions(self) -> list[str]:
        """The sessions with local subscribers."""
        return list(self._local)

    @property
    def local_subscriptions(self) -> int:
        return sum(len(subs) for subs in self._local.values())


ControlHandler = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """What a backend counts for /metrics (a backend without the thing counted says 0)."""

    reconnects: int = 0  # times its link to the other instances was re-established


# The broker's roles. Callers that need one role are typed against it, so what each part of the
# service asks of a backend is written where it asks; `Broker` is every role at once.


class Lifecycle(Protocol):
    """Opening and closing a backend, and what it declares to the rest of the service: whether
    its state is `shared` by every instance that names it, its health and its stats."""

    kind: ClassVar[str]  # its name in logs and /readyz
    # Every instance using it sees the same state: another instance can resume a socket, and
    # a restarting one need not keep its sockets open until their replies end.
    shared: ClassVar[bool]

    @classmethod
    def from_settings(cls, settings: Settings) -> Broker:
        """The backend `settings` configure (connections open in `start`)."""

    async def start(self, instance: str, on_control: ControlHandler) -> None:
        """Connect, and deliver control messages sent to `instance` to `on_control`."""

    async def close(self) -> None: ...

    async def check(self) -> dict[str, Any]:
        """Health for /readyz: {"ok": bool, ...details}. Never raises."""

    def stats(self) -> BrokerStats:
        """Its counts for /metrics, read at scrape time. Never raises, never waits."""


class EventLog(Protocol):
    """Sessions and their replayable event log, numbered by `seq`."""

    @property
    def epoch(self) -> str:
        """The data's epoch: a new one begins when the broker lost data (docs/protocol.md,
        `epoch`)."""

    async def create_session(self, session: str) -> None:
        """Store a session (with no events). Never resets one that exists."""

    async def last_seq(self, session: str) -> int | None:
        """The session's last `seq` (0 when empty), or None when the session does not exist."""

    async def append(self, session: str, event: dict[str, Any], key: str | None = None) -> Event:
        """Give `event` the next seq, log it, publish it to the session's subscribers.

        `SessionExpired` when the session does not exist (it expired, or Redis lost it): started
        afresh at seq 1 it would reuse seqs its sockets have seen.

        `key` makes a retry safe: when the session's last appended event had the same key, that
        event is returned and nothing is appended (a call whose answer was lost to a broken
        connection may have run). Only the last key is remembered: a writer retries an append
        before it makes the next."""

    async def finish(self, session: str, event: dict[str, Any], lease: Lease) -> bool:
        """Atomically append `event` and release `lease`, if `lease` still holds the session.

        False, appending nothing, when the lease was lost (another instance closed the reply).
        Finishing again with the same lease (a retry of a finish whose answer was lost) is True
        and appends nothing more, as long as nothing was appended since.
        """

    async def replay(self, session: str, after: int, max_bytes: int | None = None) -> list[Event]:
        """Logged events with seq > `after`, in order (the oldest may have been trimmed); with
        `max_bytes`, only the first of them, up to the first whose frames reach that many
        characters (at least one event): a page. A page shorter than `max_bytes` is the last."""


class FanOut(Protocol):
    """Live frames to the sockets of a session, wherever they are, and control messages to an
    instance. The local half is `LocalFanOut`, the same for every backend."""

    def subscribe(
        self, session: str, max_bytes: int = SUBSCRIPTION_MAX_BYTES
    ) -> AbstractAsyncContextManager[Subscription]:
        """Live events of `session` from the moment this returns (the subscription is active)."""

    async def announce(self, session: str, frame: dict[str, Any]) -> None:
        """Send a transient frame (no seq, not logged) to the session's live sockets."""

    async def signal(self, instance: str, message: dict[str, Any]) -> None:
        """Send a control message to one instance (at-most-once)."""


class History(Protocol):
    """The model context of each session: its last turns."""

    async def history(self, session: str) -> list[Message]: ...

    async def add_turn(self, session: str, role: str, content: str, key: str | None = None) -> None:
        """Add a turn to the model context. `key` makes a retry safe, as for `append`: the same
        key as the last turn's adds nothing."""


class Leases(Protocol):
    """One generation per session, cluster-wide."""

    async def acquire(self, session: str, lease: Lease, ttl_s: float) -> bool:
        """Take the session's lease, unless another lease holds it (even an expired one). True
        too when `lease` itself holds it: a retry of an acquire whose answer was lost."""

    async def renew(self, session: str, lease: Lease, ttl_s: float) -> bool: ...

    async def release(self, session: str, lease: Lease) -> None: ...

    async def lease(self, session: str) -> Lease | None: ...

    async def claim_expired(self, claimant: str, ttl_s: float) -> list[tuple[str, Lease]]:
        """Take over leases whose owner stopped renewing them (it died).

        Each returned session is now leased to `claimant` with the dead lease's `msg_id`, so no
        new message is accepted until the claimant has closed the orphaned reply and released.
        """


class Counters(Protocol):
    """What the abuse limits count in: shared counters, and the rate limits' storage."""

    def rate_limit_storage(self, key_prefix: str) -> Storage:
        """The `limits` storage of the rate limits, as shared as the backend's state; its keys
        start with `key_prefix`."""

    async def adjust(self, key: str, delta: int, ttl_s: int) -> int:
        """Add `delta` to this instance's share of a shared counter; the counter's value, the sum
        of the shares of the instances alive. The share is exact whatever retries happen, and
        stops counting when its instance dies (a few seconds after it stops saying it is alive);
        a counter nobody changes for `ttl_s` is forgotten. The change stands even when the call
        fails: the instance tells the broker later."""


class Secrets(Protocol):
    """The secret every instance shares."""

    async def secret(self) -> bytes:
        """A random secret shared by every instance (the first to ask makes it): it signs the
        ids of sessions that are not stored yet (`chat/sessions.py`)."""


class Tasks(Protocol):
    """Tasks of the HTTP ask API (a reply addressed without a socket)."""

    async def put_task(self, task: str, record: dict[str, Any]) -> None: ...

    async def get_task(self, task: str) -> dict[str, Any] | None: ...


class Broker(Lifecycle, EventLog, FanOut, History, Leases, Counters, Secrets, Tasks, Protocol):
    """Shared state and messaging of the cluster: every role at once. All methods may raise
    `BrokerUnavailable`. A backend is a class with all of these members (it need not name the
    protocols), its local fan-out a `LocalFanOut`."""
