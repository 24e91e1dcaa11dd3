"""A socket's view of a session: replay from the log, then live events, with no gap or duplicate.

The order of operations is what makes resume exact: subscribe first, then read the log, then pass
live events through, dropping any whose seq was already sent. A live event that skips ahead (pub/sub
dropped something, the subscription overflowed, the broker reconnected) makes the feed re-read
the log from its last seq, so what the log holds is never lost.

When the broker lost data (a new epoch: Redis restarted empty or with older data) the seqs sent so
far mean nothing: the reply the client saw open ends `interrupted`, and the socket either starts
over (`resync`, then the whole log again) or, its session gone, hears `session_expired` and ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

from .. import protocol
from ..broker import GONE, NEW_EPOCH, RESYNC, Event, EventLog, FanOut, Subscription, cancelling
from ..errors import BrokerUnavailable, SessionExpired, refusal

log = logging.getLogger(__name__)

# A replay is read from the log this many characters of frames at a time (or SOCKET_BACKLOG_BYTES
# if less): what a socket holds of it, where the whole log (up to SESSION_LOG_MAX_EVENTS events)
# was held by every socket that asked for `after=0`.
REPLAY_PAGE_BYTES = 64 * 1024
REPLAY_RETRY_S = (0.05, 2.0)  # first and longest wait between replay attempts in an outage
_END = "\x00end"  # a local item no frame can equal: frames are JSON objects
T = TypeVar("T")


class LiveLog(EventLog, FanOut, Protocol):
    """What a feed reads: the session's log, and its live events."""


class Feed:
    """The frames (JSON text) to send to one socket, in order, one `step` at a time.

    Besides session events it carries this socket's own frames (`push_local`), so one sender
    writes everything and frames never interleave mid-write.
    """

    def __init__(
        self, broker: EventLog, sub: Subscription, after: int, page_bytes: int | None = None
    ) -> None:
        self._broker = broker
        self._sub = sub
        self.last_seq = after
        # Events read from the log, still to send, newest first (popped from the end): one page
        # of the replay (`page_bytes` of frames), the next read once it is sent. A list, not a
        # deque, because an idle socket holds one.
        self._backlog: list[Event] = []
        self._page_bytes = page_bytes
        self._replay_needed = True
        self.epoch = broker.epoch  # what the client was told the seqs belong to
        self._open_reply: str | None = None  # the reply the client saw begin and not end
        # Frames to send before anything else, first last; a shared empty tuple while there
        # are none (an idle socket holds one of these).
        self._notices: list[str] | tuple[()] = ()

    def push_local(self, frame: str) -> None:
        self._sub.push(frame)

    @property
    def overflowed(self) -> asyncio.Future[None]:
        """Set when the socket fell more than its byte limit behind (it stopped reading)."""
        return self._sub.overflowed

    def end(self) -> None:
        """End the feed (`step` returns None) once everything pushed before has been sent."""
        self._sub.push(_END)

    def step(self) -> str | Awaitable[object] | None:
        """What comes next, without waiting: a frame to send, None at the end, or something to
        await before stepping again (the next live event, a read of the log).

        The socket's sender steps the feed itself: a delta then costs it one wait on a future,
        where an async iterator cost a coroutine for every layer (docs/benchmarks.md)."""
        while True:
            if self._notices:
                notice = self._notices.pop()
                return None if notice is _END else notice
            if self._backlog:
                event = self._backlog.pop()
                if event.seq > self.last_seq:
                    return self._sent(event)
                continue
            if self._replay_needed:
                return self._next_page()
            item = self._sub.pop()
            if item is None:
                return self._sub.wait()
            if isinstance(item, Event):
                if item.seq == self.last_seq + 1:
                    return self._sent(item)
                if item.seq > self.last_seq:
                    return self._fill_gap(item)
            elif item is _END:
                return None
            elif isinstance(item, str):
                return item
            elif item is RESYNC:
                self._replay_needed = True
            elif item is NEW_EPOCH:
                return self._starting_over()

    async def _next_page(self) -> None:
        page, self._replay_needed = await self._replay()
        self._backlog = page[::-1]
        _check_cancelled()

    async def _fill_gap(self, item: Event) -> None:
        """`item` skipped ahead: fetch the gap from the log. The log holds `item` too (events
        are logged before they are published); if it was trimmed meanwhile, `item` still follows
        (unless more pages follow: the log's later pages hold it)."""
        page, self._replay_needed = await self._replay()
        self._backlog = page[::-1] if self._replay_needed else [item, *reversed(page)]
        _check_cancelled()

    async def _starting_over(self) -> None:
        await self._start_over()
        _check_cancelled()

    def _sent(self, event: Event) -> str:
        self.last_seq = event.seq
        kind = event.data["type"]
        if kind == "user":
            self._open_reply = event.data["id"]
        elif kind == "done":
            self._open_reply = None
        return event.frame

    async def _start_over(self) -> None:
        """The broker began a new epoch: queue what the client must hear (`_notices`)."""
        epoch = self._broker.epoch
        if epoch == self.epoch:
            return  # this socket started in it
        self.epoch = epoch
        session = self._sub.session
        last = await self._retrying(self._broker.last_seq, session)
        notices = []
        if self._open_reply is not None:  # its end was lost with the data, or will never come
            done = protocol.done_event(self._open_reply, "interrupted")
            notices.append(protocol.encode(done))
        if last is None:
            log.info("session %s… lost with the broker's data", session[:6])
            expired = SessionExpired(GONE)
            notices += [protocol.encode(protocol.refusal(refusal(expired))), _END]
        else:
            log.info("session %s… starts over in epoch %s", session[:6], epoch)
            notices.append(protocol.encode(protocol.resync(epoch, last)))
            self.last_seq = 0
            self._backlog = []
            self._replay_needed = True
        self._open_reply = None
        self._notices = notices[::-1]

    async def _replay(self) -> tuple[list[Event], bool]:
        """The next page of the log after `last_seq`, and whether more may follow it."""
        size = self._page_bytes
        page = await self._retrying(self._broker.replay, self._sub.session, self.last_seq, size)
        more = size is not None and sum(len(event.frame) for event in page) >= size
        return page, more

    async def _retrying(self, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        """A read of the log. While the broker is down the socket stays open and waits: the
        read is retried with backoff until the broker answers again."""
        delay = REPLAY_RETRY_S[0]
        while True:
            try:
                return await call(*args)
            except BrokerUnavailable:
                log.warning("replay for session %s… waits for the broker", self._sub.session[:6])
                await asyncio.sleep(delay)
                delay = min(delay * 2, REPLAY_RETRY_S[1])


def _check_cancelled() -> None:
    """After a read of the log: a cancellation that a client library swallowed below us
    (redis-py can, mid command) must still end the feed, or the socket's sender waits forever.
    (Only the broker's reads can swallow one: the feed's own waits are on its futures.)"""
    if cancelling():
        raise asyncio.CancelledError


@asynccontextmanager
async def open_feed(
    broker: LiveLog, session: str, after: int, max_bytes: int
) -> AsyncIterator[Feed]:
    """A feed whose live queue and replay pages each hold at most about `max_bytes` of frames
    (SOCKET_BACKLOG_BYTES): a replay of the whole log is read a page at a time as it is sent."""
    async with broker.subscribe(session, max_bytes) as sub:
        yield Feed(broker, sub, after, min(max_bytes, REPLAY_PAGE_BYTES))
