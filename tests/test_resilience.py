"""The resilience layer over a second provider (`chatbot/llm/resilient.py`).

`QueueProvider` is a whole provider in a few lines, implementing only the `Provider` interface:
its replies' pieces are what the test puts on its queue, when the test puts them. It gets the
retries, the first-token and idle deadlines and the circuit breaker from `ResilientModel`, the
layer the OpenAI and demo providers go through too. The deadlines are real loop timers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import pytest

from chatbot.errors import CircuitOpen, UpstreamError
from chatbot.llm import Message, open_model
from chatbot.llm.base import Deadlines
from chatbot.llm.breaker import CircuitBreaker
from chatbot.llm.demo import DemoProvider
from chatbot.llm.resilient import ResilientModel
from chatbot.settings import Settings

HI: list[Message] = [{"role": "user", "content": "hi"}]
WAIT_S = 10  # for anything that is not the deadline under test


class QueueStream:
    def __init__(self, pieces: asyncio.Queue[str | None]) -> None:
        self._pieces = pieces
        self.finish_reason: str | None = None
        self.closed = False

    async def pieces(self, deadlines: Deadlines) -> AsyncIterator[str]:
        with deadlines:
            while (piece := await self._pieces.get()) is not None:  # None: the reply ends
                deadlines.arrived()
                yield piece
                deadlines.waiting()
        self.finish_reason = "stop"

    async def close(self) -> None:
        self.closed = True


class QueueProvider:
    name = "queue"
    demo = False

    def __init__(self, *failures: UpstreamError) -> None:
        self.failures = list(failures)  # what the next requests fail with, in order
        self.pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self.streams: list[QueueStream] = []
        self.requests = 0
        self.opened = asyncio.Event()

    async def open(self, messages: Sequence[Message]) -> QueueStream:
        self.requests += 1
        if self.failures:
            raise self.failures.pop(0)
        self.streams.append(QueueStream(self.pieces))
        self.opened.set()
        return self.streams[-1]

    async def close(self) -> None:
        return None


def resilient(
    provider: QueueProvider,
    *,
    first_token_timeout_s: float = WAIT_S,
    idle_timeout_s: float = WAIT_S,
    max_retries: int = 2,
    breaker: CircuitBreaker | None = None,
) -> ResilientModel:
    return ResilientModel(
        provider,
        first_token_timeout_s=first_token_timeout_s,
        idle_timeout_s=idle_timeout_s,
        max_retries=max_retries,
        breaker=breaker or CircuitBreaker(5, 15.0),
    )


def down(retry_in_s: float | None = 0, status: int | None = 503) -> UpstreamError:
    return UpstreamError("upstream_unavailable", "Down.", retry_in_s=retry_in_s, status=status)


def feed(provider: QueueProvider, *pieces: str | None) -> None:
    for piece in pieces:
        provider.pieces.put_nowait(piece)


async def reply_of(model: ResilientModel) -> str:
    async with asyncio.timeout(WAIT_S), model.stream(HI) as reply:
        text = "".join([piece async for piece in reply])
    assert reply.finish_reason == "stop"
    return text


async def test_retryable_failures_are_retried_and_the_reply_streams(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = QueueProvider(down(), down(status=None))
    model = resilient(provider)
    feed(provider, "Hello", " world", None)
    with caplog.at_level(logging.INFO, logger="chatbot.llm.resilient"):
        assert await reply_of(model) == "Hello world"
    assert provider.requests == 3
    assert [r.getMessage() for r in caplog.records] == [
        "model service: HTTP 503; retry 1 of 2 in 0.00 s",
        "model service: UpstreamError; retry 2 of 2 in 0.00 s",
    ]
    assert provider.streams[0].closed
    assert model.upstream_status() == {"breaker": "closed", "consecutive_failures": 0}


async def test_the_pieces_are_the_providers_own_iterator() -> None:
    """No layer between the provider and the reader: nothing per piece but the provider's."""
    provider = QueueProvider()
    async with asyncio.timeout(WAIT_S), resilient(provider).stream(HI) as reply:
        pieces = aiter(reply)
        assert pieces.ag_code is QueueStream.pieces.__code__  # type: ignore[attr-defined]
        feed(provider, "one", None)
        assert [piece async for piece in pieces] == ["one"]


@pytest.mark.parametrize(
    ("failure", "first_token_timeout_s"),
    [
        (UpstreamError("upstream_rejected", "No.", retryable=False), WAIT_S),
        (down(retry_in_s=20), 5),  # the wait would outlast the first-token deadline
        (down(retry_in_s=121), 300),  # longer than any server may make us wait
    ],
)
async def test_what_must_not_be_retried_fails_at_once(
    failure: UpstreamError, first_token_timeout_s: float
) -> None:
    provider = QueueProvider(failure)
    model = resilient(provider, first_token_timeout_s=first_token_timeout_s)
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamError) as caught:
        await reply_of(model)
    assert caught.value is failure
    assert asyncio.get_running_loop().time() - started < 1
    assert provider.requests == 1


async def test_retries_stop_at_max_retries() -> None:
    provider = QueueProvider(down(), down(), down())
    with pytest.raises(UpstreamError) as caught:
        await reply_of(resilient(provider, max_retries=2))
    assert caught.value.code == "upstream_unavailable"
    assert provider.requests == 3


async def test_first_token_deadline() -> None:
    provider = QueueProvider()
    model = resilient(provider, first_token_timeout_s=0.3)
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamError) as caught:
        await reply_of(model)
    elapsed = asyncio.get_running_loop().time() - started
    assert caught.value.code == "upstream_timeout"
    assert caught.value.message == "The model service did not start answering within 0.3 s."
    assert 0.3 <= elapsed < 3
    assert provider.streams[0].closed
    assert model.upstream_status() == {"breaker": "closed", "consecutive_failures": 1}


async def test_idle_deadline_after_the_first_piece() -> None:
    provider = QueueProvider()
    model = resilient(provider, idle_timeout_s=0.3)
    feed(provider, "one")
    seen = []
    with pytest.raises(UpstreamError) as caught:
        async with asyncio.timeout(WAIT_S), model.stream(HI) as reply:
            async for piece in reply:
                seen.append(piece)
    assert seen == ["one"]
    assert caught.value.message == "The model service stopped answering for 0.3 s mid-reply."
    assert provider.requests == 1  # never retried once a piece was seen
    assert provider.streams[0].closed
    assert model.upstream_status() == {"breaker": "closed", "consecutive_failures": 1}


async def test_the_readers_own_time_is_not_the_services() -> None:
    provider = QueueProvider()
    model = resilient(provider, first_token_timeout_s=0.2, idle_timeout_s=0.2)
    feed(provider, "slow", " reader", None)
    pieces = []
    async with asyncio.timeout(WAIT_S), model.stream(HI) as reply:
        async for piece in reply:
            pieces.append(piece)
            await asyncio.sleep(0.35)  # a reader slower than the deadline is the behaviour
    assert pieces == ["slow", " reader"]


async def test_a_stop_is_not_a_timeout_and_counts_for_nothing() -> None:
    provider = QueueProvider()
    model = resilient(provider, first_token_timeout_s=WAIT_S)

    async def read() -> None:
        async with model.stream(HI) as reply:
            async for _ in reply:
                pass

    task = asyncio.create_task(read())
    async with asyncio.timeout(WAIT_S):
        await provider.opened.wait()  # the reader now waits for the first piece
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert provider.streams[0].closed
    assert model.upstream_status() == {"breaker": "closed", "consecutive_failures": 0}


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_breaker_stops_calling_a_service_that_is_down() -> None:
    clock = Clock()
    provider = QueueProvider(down(), down())
    model = resilient(provider, max_retries=0, breaker=CircuitBreaker(2, 10.0, clock))
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await reply_of(model)
    assert model.upstream_status() == {"breaker": "open", "consecutive_failures": 2}
    with pytest.raises(CircuitOpen) as caught:
        await reply_of(model)
    assert caught.value.retry_after_s == 10
    assert provider.requests == 2  # not called

    clock.now += 10  # the cooldown is over: one trial goes through
    feed(provider, "back", None)
    assert await reply_of(model) == "back"
    assert model.upstream_status() == {"breaker": "closed", "consecutive_failures": 0}


async def test_the_demo_provider_goes_through_the_same_layer() -> None:
    model = open_model(Settings(demo_word_delay_s=0))
    assert isinstance(model.provider, DemoProvider)
    assert (await reply_of(model)).startswith("(Demo mode: no model is configured")
    await model.close()
