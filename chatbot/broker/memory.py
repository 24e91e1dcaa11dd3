"""The in-process broker: the default (no REDIS_URL) and the reference for every other backend.

Everything lives in this process, so it serves exactly one instance. Sessions expire after
`session_ttl_s` without activity, like their Redis twins.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from limits.aio.storage import MemoryStorage

from ..errors import SessionExpired
from ..llm.base import Message
from ..patches.limits import paced_memory_storage
from ..protocol import encode, new_id
from . import base
from .base import GONE, BrokerStats, ControlHandler, Event, Lease, LocalFanOut

if TYPE_CHECKING:
    from ..settings import Settings
    from .base import Broker

# A logged event as the log keeps it: (seq, frame), its JSON text, parsed again for a replay as
# the Redis log's entries are. A tuple of an int and a string is untracked by the first young
# collection that sees it, so the events the logs hold are never scanned again by the middle
# and full collections, whose pauses grew with every event held; an `Event` (a dataclass, with
# a dict) stays tracked for life, and takes ~250 bytes more (docs/benchmarks.md, "The GC").
_Logged = tuple[int, str]


@dataclass(slots=True)
class _Session:
    # Created on first use: a socket that opens a session and says nothing holds no deques.
    log: deque[_Logged] | None = None
    history: deque[Message] | None = None
    seq: int = 0
    last_key: str | None = None  # of the last appended event (see Broker.append)
    last_turn: str | None = None  # of the last history turn added (see Broker.add_turn)
    touched: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Held:
    lease: Lease
    deadline: float


class MemoryBroker(LocalFanOut):
    kind: ClassVar[str] = "memory"
    shared: ClassVar[bool] = False  # one process's memory

    @classmethod
    def from_settings(cls, settings: Settings) -> MemoryBroker:
        return cls(
            history_turns=settings.history_turns,
            log_max_events=settings.session_log_max_events,
            session_ttl_s=settings.session_ttl_s,
        )

    def __init__(self, *, history_turns: int, log_max_events: int, session_ttl_s: float) -> None:
        super().__init__()  # its sockets are all the fan-out there is
        self._history_turns = history_turns
        self._log_max = log_max_events
        self._ttl_s = session_ttl_s
        self._sessions: dict[str, _Session] = {}
        self._leases: dict[str, _Held] = {}
        self._tasks: dict[str, tuple[float, dict[str, Any]]] = {}
        self._counters: dict[str, int] = {}
        self._control: dict[str, ControlHandler] = {}
        self._secret = secrets.token_bytes(32)
        self.epoch = new_id()  # this process's memory: it never loses data but with itself
        self.closed = False  # then no control message reaches an instance; the data stays

    async def start(self, instance: str, on_control: ControlHandler) -> None:
        self._control[instance] = on_control

    async def close(self) -> None:
        self._control.clear()
        self.closed = True

    async def check(self) -> dict[str, Any]:
        return {"ok": True, "backend": self.kind, "sessions": len(self._sessions)}

    def stats(self) -> BrokerStats:
        return BrokerStats()

    def rate_limit_storage(self, key_prefix: str) -> MemoryStorage:
        return paced_memory_storage()  # this process's keys alone: no prefix needed

    async def secret(self) -> bytes:
        return self._secret

    async def create_session(self, session: str) -> None:
        # Expired sessions are purged by the periodic sweep (claim_expired), not here: a scan
        # per new socket made opening N sockets O(N^2) (docs/benchmarks.md).
        if self._live(session) is None:  # never resets a session that has events
            self._sessions[session] = _Session()

    async def last_seq(self, session: str) -> int | None:
        state = self._live(session)
        return None if state is None else state.seq

    async def append(self, session: str, event: dict[str, Any], key: str | None = None) -> Event:
        state = self._live(session)
        if state is None:
            raise SessionExpired(GONE)
        if key is not None and key == state.last_key and state.log:
            return Event.from_frame(state.log[-1][1])
        state.last_key = key
        state.seq += 1
        data = {"type": event["type"], "seq": state.seq, **event}
        frame = encode(data)
        if state.log is None:
            state.log = deque(maxlen=self._log_max)
        state.log.append((state.seq, frame))
        logged = Event(seq=state.seq, data=data, frame=frame)
        self._deliver(session, logged)
        return logged

    async def finish(self, session: str, event: dict[str, Any], lease: Lease) -> bool:
        key = f"{lease.token}:done"
        state = self._sessions.get(session)
        if state is not None and state.last_key == key:
            return True  # finished already
        held = self._leases.get(session)
        if held is None or held.lease != lease:
            return False
        del self._leases[session]
        await self.append(session, event, key)
        return True

    async def replay(self, session: str, after: int, max_bytes: int | None = None) -> list[Event]:
        state = self._live(session)
        if state is None or after >= state.seq:
            return []
        return base.take_page((frame for seq, frame in state.log or () if seq > after), max_bytes)

    async def announce(self, session: str, frame: dict[str, Any]) -> None:
        self._deliver(session, encode(frame))

    async def signal(self, instance: str, message: dict[str, Any]) -> None:
        handler = self._control.get(instance)
        if handler is not None:
            asyncio.get_running_loop().call_soon(handler, message)

    async def history(self, session: str) -> list[Message]:
        state = self._live(session)
        return [] if state is None else list(state.history or ())

    async def add_turn(self, session: str, role: str, content: str, key: str | None = None) -> None:
        state = self._live(session)
        if state is not None and (key is None or key != state.last_turn):
            state.last_turn = key
            if state.history is None:
                state.history = deque(maxlen=2 * self._history_turns)
            state.history.append({"role": role, "content": content})

    async def acquire(self, session: str, lease: Lease, ttl_s: float) -> bool:
        held = self._leases.get(session)
        now = time.monotonic()
        if held is not None and held.lease == lease:
            return True  # asked again by its holder
        if held is not None and held.deadline > now:
            return False
        if held is not None:
            return False  # expired but not yet claimed: the sweeper closes the orphan first
        self._leases[session] = _Held(lease, now + ttl_s)
        return True

    async def renew(self, session: str, lease: Lease, ttl_s: float) -> bool:
        held = self._leases.get(session)
        if held is None or held.lease != lease or held.deadline <= time.monotonic():
            return False
        held.deadline = time.monotonic() + ttl_s
        return True

    async def release(self, session: str, lease: Lease) -> None:
        held = self._leases.get(session)
        if held is not None and held.lease == lease:
            del self._leases[session]

    async def lease(self, session: str) -> Lease | None:
        held = self._leases.get(session)
        return None if held is None else held.lease

    async def claim_expired(self, claimant: str, ttl_s: float) -> list[tuple[str, Lease]]:
        now = time.monotonic()
        claimed = []
        for session, held in list(self._leases.items()):
            if held.deadline <= now:
                taken = Lease(owner=claimant, msg_id=held.lease.msg_id, token=new_id())
                self._leases[session] = _Held(taken, now + ttl_s)
                claimed.append((session, taken))
        self._purge_expired()
        return claimed

    async def adjust(self, key: str, delta: int, ttl_s: int) -> int:
        value = self._counters.get(key, 0) + delta
        if value:
            self._counters[key] = value
        else:
            self._counters.pop(key, None)
        return value

    async def put_task(self, task: str, record: dict[str, Any]) -> None:
        self._tasks[task] = (time.monotonic() + self._ttl_s, record)

    async def get_task(self, task: str) -> dict[str, Any] | None:
        entry = self._tasks.get(task)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def _live(self, session: str) -> _Session | None:
        state = self._sessions.get(session)
        if state is None:
            return None
        now = time.monotonic()
        if now - state.touched > self._ttl_s:
            del self._sessions[session]
            return None
        state.touched = now
        return state

    def _purge_expired(self) -> None:
        cutoff = time.monotonic() - self._ttl_s
        for session in [s for s, state in self._sessions.items() if state.touched < cutoff]:
            if session not in self._leases:
                del self._sessions[session]
        now = time.monotonic()
        for task in [t for t, (deadline, _) in self._tasks.items() if deadline <= now]:
            del self._tasks[task]


if TYPE_CHECKING:  # mypy checks that it plays every role of a broker
    _: type[Broker] = MemoryBroker
