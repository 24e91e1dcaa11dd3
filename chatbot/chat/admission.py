"""Admission control: at most `limit` replies talk to the model at once on this instance.

Beyond the limit, replies wait in a bounded FIFO queue (their clients are told their position);
beyond the queue, new messages are refused at once with `overloaded`. Overload then costs a
clear error instead of every reply slowing down until all of them time out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .. import metrics
from ..errors import Overloaded


class Ticket:
    """A reserved place: `position` 0 means a slot is free now, k > 0 the k-th in the queue."""

    __slots__ = ("_admitted", "position")

    def __init__(self, position: int, admitted: asyncio.Future[None]) -> None:
        self.position = position
        self._admitted = admitted


class Admission:
    def __init__(self, limit: int, queue_limit: int) -> None:
        self.limit = limit
        self.queue_limit = queue_limit
        self.active = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def reserve(self) -> Ticket:
        """Take a slot or a place in the queue at once; raise `Overloaded` when both are full.

        Called before the message is accepted, so a refused message leaves no trace.
        """
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.active < self.limit and not self._queue:
            self.active += 1
            admitted.set_result(None)
            return Ticket(0, admitted)
        if len(self._queue) >= self.queue_limit:
            metrics.OVERLOADED.inc()
            raise Overloaded(
                f"the server is at capacity ({self.limit} replies streaming, {self.queue_limit} "
                "waiting); try again in a few seconds"
            )
        self._queue.append(admitted)
        return Ticket(len(self._queue), admitted)

    @asynccontextmanager
    async def slot(self, ticket: Ticket) -> AsyncIterator[None]:
        """Hold the ticket's slot for the duration; wait for it first if the ticket is queued."""
        try:
            await ticket._admitted
        except asyncio.CancelledError:
            if not ticket._admitted.done() or ticket._admitted.cancelled():
                # Left the queue before its turn: free the place, take no slot.
                if ticket._admitted in self._queue:
                    self._queue.remove(ticket._admitted)
                raise
            self._release()  # admitted in the same tick it was cancelled
            raise
        try:
            yield
        finally:
            self._release()

    def cancel(self, ticket: Ticket) -> None:
        """Give up a ticket that will never be used (the message was not accepted after all)."""
        if ticket._admitted.done() and not ticket._admitted.cancelled():
            self._release()
        else:
            ticket._admitted.cancel()
            if ticket._admitted in self._queue:
                self._queue.remove(ticket._admitted)

    def _release(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                return
        self.active -= 1
