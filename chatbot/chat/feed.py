"""A socket's view of a session: replay from the log, then live events, with no gap or duplicate.

The order of operations is what makes resume exact: subscribe first, then read the log, then pass
live events through, dropping any whose seq was already sent. A live event that skips ahead (pub/sub
dropped something, the subscription overflowed, the broker reconnected) makes the feed re-read
the log from its last seq, so what the log holds is never lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..broker import RESYNC, Broker, Event, Subscription, cancelling
from ..errors import BrokerUnavailable

log = logging.getLogger(__name__)

REPLAY_RETRY_S = (0.05, 2.0)  # first and longest wait between replay attempts in an outage
_END = "\x00end"  # a local item no frame can equal: frames are JSON objects


class Feed:
    """Iterate for frames (JSON text) to send to one socket, in order.

    Besides session events it carries this socket's own frames (`push_local`), so one sender
    writes everything and frames never interleave mid-write.
    """

    def __init__(self, broker: Broker, sub: Subscription, after: int) -> None:
        self._broker = broker
        self._sub = sub
        self.last_seq = after
        # Events read from the log, still to send, newest first (popped from the end). Refilled
        # only when empty; a list, not a deque, because an idle socket holds one.
        self._backlog: list[Event] = []
        self._replay_needed = True

    def push_local(self, frame: str) -> None:
        self._sub.push(frame)

    @property
    def overflowed(self) -> asyncio.Future[None]:
        """Set when the socket fell more than its byte limit behind (it stopped reading)."""
        return self._sub.overflowed

    def end(self) -> None:
        """End the iteration once everything pushed before has been yielded."""
        self._sub.push(_END)

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        while True:
            if cancelling():
                # A cancellation that a client library swallowed below us (redis-py can, mid
                # command) must still end the feed, or the socket's sender waits forever.
                raise asyncio.CancelledError
            if self._backlog:
                event = self._backlog.pop()
                if event.seq > self.last_seq:
                    self.last_seq = event.seq
                    return event.frame
                continue
            if self._replay_needed:
                self._backlog = (await self._replay())[::-1]
                self._replay_needed = False
                continue
            item = await self._sub.get()
            if item is _END:
                raise StopAsyncIteration
            if isinstance(item, str):
                return item
            if item is RESYNC:
                self._replay_needed = True
            elif isinstance(item, Event) and item.seq > self.last_seq:
                if item.seq == self.last_seq + 1:
                    self.last_seq = item.seq
                    return item.frame
                # A gap: fetch it from the log. The log holds `item` too (events are logged
                # before they are published); if it was trimmed meanwhile, `item` still follows.
                self._backlog = [item, *reversed(await self._replay())]

    async def _replay(self) -> list[Event]:
        """The log after `last_seq`. While the broker is down the socket stays open and waits:
        the replay is retried with backoff until the broker answers again."""
        delay = REPLAY_RETRY_S[0]
        while True:
            try:
                return await self._broker.replay(self._sub.session, self.last_seq)
            except BrokerUnavailable:
                log.warning("replay for session %s… waits for the broker", self._sub.session[:6])
                await asyncio.sleep(delay)
                delay = min(delay * 2, REPLAY_RETRY_S[1])


@asynccontextmanager
async def open_feed(
    broker: Broker, session: str, after: int, max_bytes: int
) -> AsyncIterator[Feed]:
    async with broker.subscribe(session, max_bytes) as sub:
        yield Feed(broker, sub, after)
