"""The circuit breaker on its own, with a hand-driven clock (`chatbot/llm/breaker.py`)."""

from __future__ import annotations

import pytest

from chatbot.errors import CircuitOpen
from chatbot.llm.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with breaker.attempt() as attempt:
            attempt.failed()


def test_consecutive_failures_open_it_and_it_refuses_until_the_cooldown(clock: Clock) -> None:
    breaker = CircuitBreaker(3, 10.0, clock)
    fail(breaker, 2)
    assert breaker.status() == {"breaker": "closed", "consecutive_failures": 2}
    fail(breaker)
    assert breaker.status() == {"breaker": "open", "consecutive_failures": 3}
    clock.now += 2.5
    with pytest.raises(CircuitOpen) as refused:
        breaker.attempt()
    assert refused.value.code == "upstream_unavailable"
    assert refused.value.retry_after_s == 8  # rounded up: never tell a user to come back early
    assert "down" in refused.value.message and "8 s" in refused.value.message


def test_a_success_resets_the_count(clock: Clock) -> None:
    breaker = CircuitBreaker(3, 10.0, clock)
    fail(breaker, 2)
    with breaker.attempt() as attempt:
        attempt.succeeded()
    fail(breaker, 2)
    assert breaker.status() == {"breaker": "closed", "consecutive_failures": 2}


def test_half_open_admits_one_trial_whose_success_closes_it(clock: Clock) -> None:
    breaker = CircuitBreaker(1, 10.0, clock)
    fail(breaker)
    clock.now += 10
    assert breaker.state == "half_open"
    with breaker.attempt() as trial:
        with pytest.raises(CircuitOpen):  # one trial at a time
            breaker.attempt()
        trial.succeeded()
        assert breaker.state == "closed"
        breaker.attempt()  # admitted again while the trial's stream goes on


def test_a_failed_trial_opens_it_for_another_cooldown(clock: Clock) -> None:
    breaker = CircuitBreaker(1, 10.0, clock)
    fail(breaker)
    clock.now += 10
    fail(breaker)  # the trial
    assert breaker.state == "open"
    clock.now += 9
    with pytest.raises(CircuitOpen):
        breaker.attempt()
    clock.now += 1
    assert breaker.state == "half_open"


def test_a_trial_that_ends_without_a_verdict_frees_the_slot(clock: Clock) -> None:
    breaker = CircuitBreaker(1, 10.0, clock)
    fail(breaker)
    clock.now += 10
    with pytest.raises(RuntimeError), breaker.attempt():
        raise RuntimeError("cancelled, or a failure that says nothing about the service")
    with breaker.attempt() as second_trial:
        second_trial.succeeded()
    assert breaker.state == "closed"


def test_a_failure_after_a_success_in_one_attempt_counts(clock: Clock) -> None:
    breaker = CircuitBreaker(2, 10.0, clock)
    with breaker.attempt() as attempt:
        attempt.succeeded()  # the first token came
        attempt.failed()  # then the stream broke
        attempt.failed()  # counted once
    assert breaker.status() == {"breaker": "closed", "consecutive_failures": 1}
    fail(breaker)
    assert breaker.status() == {"breaker": "open", "consecutive_failures": 2}


def test_late_failures_while_open_do_not_extend_the_cooldown(clock: Clock) -> None:
    breaker = CircuitBreaker(1, 10.0, clock)
    late = breaker.attempt()  # admitted while closed, fails after the breaker opened
    fail(breaker)
    clock.now += 5
    late.failed()
    assert breaker.status() == {"breaker": "open", "consecutive_failures": 2}
    clock.now += 5
    assert breaker.state == "half_open"
