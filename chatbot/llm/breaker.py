"""A circuit breaker for the model service: when it is down, fail at once instead of piling on.

The classic three states:

- ``closed``: requests go through. Failures that mean "the service is down" (it cannot be
  reached, it timed out, it answered 5xx or 429) are counted; any sign of life resets the count.
- ``open``: after `failures` consecutive such failures, requests fail at once with `CircuitOpen`
  for `cooldown_s`, without calling the service: users get an answer in milliseconds instead of
  waiting out timeouts and retries, and a struggling service is not hammered while it recovers.
- ``half_open``: the cooldown has passed. One trial request goes through while the rest still
  fail fast; its success closes the breaker, its failure opens it for another cooldown.

Framework-free and synchronous (one event loop, no locks); the clock is injectable for tests.
One breaker per process and upstream: each instance judges the service from its own requests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal, TypedDict

from ..errors import CircuitOpen

State = Literal["closed", "open", "half_open"]


class BreakerStatus(TypedDict):
    breaker: State
    consecutive_failures: int


class CircuitBreaker:
    """Admit requests with `attempt()`; each reports `succeeded()` / `failed()` on its `Attempt`."""

    def __init__(
        self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError("a breaker needs failures >= 1 and cooldown_s > 0")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None  # None while closed
        self._trial = False  # a half-open trial request is in flight

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._trial or self._clock() >= self._opened_at + self.cooldown_s:
            return "half_open"
        return "open"

    def status(self) -> BreakerStatus:
        return {"breaker": self.state, "consecutive_failures": self._consecutive}

    def attempt(self) -> Attempt:
        """Admit one request, or raise `CircuitOpen` saying when to try again."""
        state = self.state
        if state == "closed":
            return Attempt(self, trial=False)
        assert self._opened_at is not None
        if state == "half_open" and not self._trial:
            self._trial = True
            return Attempt(self, trial=True)
        # Open, or half-open with its one trial in flight: that trial decides within about a
        # first-token timeout; a cooldown is an honest upper bound to tell the user.
        wait_s = self._opened_at + self.cooldown_s - self._clock()
        raise CircuitOpen(math.ceil(wait_s if wait_s > 0 else self.cooldown_s))

    # Verdicts, reported through an `Attempt`. Any request's evidence counts, including one
    # admitted before the breaker opened that ends while it is open or half-open.

    def _succeeded(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._trial = False

    def _failed(self, trial: bool) -> None:
        self._consecutive += 1
        if trial:
            self._trial = False
        state = self.state
        if state == "half_open" or (state == "closed" and self._consecutive >= self.failures):
            self._opened_at = self._clock()

    def _abandoned(self) -> None:
        """A trial ended with no verdict (cancelled, or a failure that says nothing about the
        service's health): let the next request be the trial."""
        self._trial = False


class Attempt:
    """One request's passage through the breaker; a context manager that frees the half-open
    trial slot however the request ends. `succeeded()` may be followed by `failed()` (a stream
    that started and then broke); each is counted once."""

    def __init__(self, breaker: CircuitBreaker, *, trial: bool) -> None:
        self._breaker = breaker
        self._trial = trial
        self._succeeded = self._failed = False

    def succeeded(self) -> None:
        """The service answered (a first token, or an HTTP answer that is not a "down" one)."""
        if not self._succeeded and not self._failed:
            self._succeeded = True
            self._breaker._succeeded()
            self._trial = False

    def failed(self) -> None:
        """The service looks down: unreachable, timed out, 5xx or 429."""
        if not self._failed:
            self._failed = True
            self._breaker._failed(self._trial)
            self._trial = False

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._trial:
            self._breaker._abandoned()
