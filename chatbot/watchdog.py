"""A deadline for a task that is cheap to push back: one timer per task, not one per wait."""

from __future__ import annotations

import asyncio
import math


class Watchdog:
    """Cancel the current task once loop time passes the deadline. Moving the deadline later,
    as every token or client frame does, is an attribute store: the timer re-arms itself when
    it fires and finds the deadline moved. Only a move earlier re-arms it at once.
    (`asyncio.timeout()` around every wait cancelled and re-created a timer each time, which
    cost more than parsing a token, and ~700 bytes per idle socket.)

    After the cancellation arrives, `expired()` tells it apart from any other (a stop, a client
    gone) and consumes it, as `asyncio.timeout` does, so the owner can raise a timeout instead.
    """

    __slots__ = ("_armed_at", "_cancelling", "_deadline", "_fired", "_loop", "_task", "_timer")

    def __init__(self, deadline: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._fired = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = self._armed_at = math.inf  # inf: no deadline, no timer
        self.move_to(deadline)

    def move_to(self, deadline: float) -> None:
        self._deadline = deadline
        if deadline < self._armed_at:
            if self._timer is not None:
                self._timer.cancel()
            self._arm()

    def pause(self) -> None:
        """No deadline until the next `move_to`: the task is doing its own work, not waiting."""
        self._deadline = math.inf

    def _arm(self) -> None:
        self._armed_at = self._deadline
        self._timer = self._loop.call_at(self._deadline, self._check)

    def _check(self) -> None:
        if self._deadline == math.inf:  # paused: `move_to` arms it again
            self._timer, self._armed_at = None, math.inf
            return
        if self._loop.time() < self._deadline:
            self._arm()
            return
        self._timer = None
        self._fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """Whether the cancellation being handled is this watchdog's (and not also another's)."""
        return self._fired and self._task.uncancel() <= self._cancelling

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
