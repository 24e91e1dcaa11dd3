"""What every broker backend promises; the same tests run against each one."""

from __future__ import annotations

import asyncio

import pytest

from chatbot.broker import Broker, Event, Lease
from chatbot.errors import SessionExpired
from chatbot.protocol import delta_event, done_event, user_event


async def next_event(sub) -> Event:
    async with asyncio.timeout(5):
        while True:
            item = await sub.get()
            if isinstance(item, Event):
                return item


async def test_unknown_session_has_no_seq(broker: Broker) -> None:
    assert await broker.last_seq("nope") is None
    await broker.create_session("s")
    assert await broker.last_seq("s") == 0


async def test_append_numbers_events_and_replay_returns_them_in_order(broker: Broker) -> None:
    await broker.create_session("s")
    first = await broker.append("s", user_event("m", "hi <&> “quotes”"))
    second = await broker.append("s", delta_event("m", "a\nb"))
    assert (first.seq, second.seq) == (1, 2)
    assert first.data == {"type": "user", "seq": 1, "id": "m", "text": "hi <&> “quotes”"}
    assert await broker.last_seq("s") == 2
    replayed = await broker.replay("s", 0)
    assert [e.frame for e in replayed] == [first.frame, second.frame]
    assert [e.data for e in await broker.replay("s", 1)] == [second.data]
    assert await broker.replay("s", 2) == []


async def test_a_replay_reads_a_page_of_at_most_max_bytes(broker: Broker) -> None:
    await broker.create_session("s")
    for _ in range(250):
        await broker.append("s", delta_event("m", "x" * 100))
    size = len((await broker.replay("s", 0))[0].frame)
    # Pages within one XRANGE batch of the Redis backend, across several, and past the log's end.
    for after, max_bytes in [(0, 10 * size), (10, 150 * size), (200, 1000 * size), (5, 1)]:
        page = await broker.replay("s", after, max_bytes=max_bytes)
        lengths = [len(e.frame) for e in page]
        assert [e.seq for e in page] == list(range(after + 1, after + 1 + len(page)))
        assert page[-1].seq == 250 or sum(lengths) >= max_bytes  # full, or the log's end
        assert sum(lengths[:-1]) < max_bytes  # not one event more than needed


async def test_concurrent_appends_of_many_sessions_keep_each_sessions_order(
    broker: Broker,
) -> None:
    """Many replies appending at once (on Redis: batched into pipelines) lose nothing and
    keep every session's events in the order its reply wrote them."""
    sessions = [f"s{i}" for i in range(50)]
    for s in sessions:
        await broker.create_session(s)

    async def reply(session: str) -> list[int]:
        return [(await broker.append(session, delta_event("m", f"{k}"))).seq for k in range(20)]

    async with asyncio.timeout(30):
        seqs = await asyncio.gather(*(reply(s) for s in sessions))
    assert all(got == list(range(1, 21)) for got in seqs)
    for s in sessions:
        texts = [e.data["text"] for e in await broker.replay(s, 0)]
        assert texts == [str(k) for k in range(20)]


async def test_a_retried_append_with_the_same_key_is_not_appended_twice(broker: Broker) -> None:
    """A writer whose append got no answer (the connection broke after Redis ran it) retries
    with the same key: the event is in the log once, and the retry gets its seq."""
    await broker.create_session("s")
    first = await broker.append("s", delta_event("m", " the"), key="m:1")
    again = await broker.append("s", delta_event("m", " the"), key="m:1")
    same_text = await broker.append("s", delta_event("m", " the"), key="m:2")
    unkeyed = [await broker.append("s", delta_event("m", "x")) for _ in range(2)]
    assert (first.seq, again.seq, same_text.seq) == (1, 1, 2)
    assert again.frame == first.frame
    assert [e.seq for e in unkeyed] == [3, 4]
    assert [e.seq for e in await broker.replay("s", 0)] == [1, 2, 3, 4]


async def test_subscribers_get_live_events_of_their_session_only(broker: Broker) -> None:
    for s in ("s", "other"):
        await broker.create_session(s)
    async with broker.subscribe("s") as one, broker.subscribe("s") as two:
        await broker.create_session("other")
        await broker.append("other", user_event("x", "not for you"))
        appended = await broker.append("s", user_event("m", "hello"))
        assert (await next_event(one)).frame == appended.frame
        assert (await next_event(two)).frame == appended.frame


async def test_a_subscription_ended_by_an_error_is_gone_and_its_session_can_be_joined_again(
    broker: Broker,
) -> None:
    await broker.create_session("s")
    with pytest.raises(LookupError):
        async with broker.subscribe("s") as gone:
            raise LookupError
    await broker.append("s", delta_event("m", "after it left"))
    assert gone.backlog_bytes == 0
    async with broker.subscribe("s") as again:
        later = await broker.append("s", delta_event("m", "to the new one"))
        assert (await next_event(again)).frame == later.frame


async def test_finish_appends_only_while_the_lease_holds(broker: Broker) -> None:
    await broker.create_session("s")
    lease = Lease("instance-a", "m", "t1")
    assert await broker.acquire("s", lease, 5)
    assert not await broker.acquire("s", Lease("instance-b", "m2", "t2"), 5)
    assert await broker.lease("s") == lease
    assert await broker.renew("s", lease, 5)
    assert await broker.finish("s", done_event("m", "stop"), lease)
    assert await broker.lease("s") is None
    # A retry of a finish that ran (its answer lost) is told it did, and appends nothing more.
    assert await broker.finish("s", done_event("m", "stop"), lease)
    assert [e.data["type"] for e in await broker.replay("s", 0)] == ["done"]
    assert await broker.acquire("s", Lease("instance-b", "m2", "t2"), 5)


async def test_every_change_can_be_retried_without_applying_twice(broker: Broker) -> None:
    """A call whose answer was lost (a Redis stall past REDIS_TIMEOUT_S) may have run; its
    retry, or a late copy, must change nothing more (issue #13, item 5)."""
    await broker.create_session("s")
    lease = Lease("instance-a", "m", "t1")
    assert await broker.acquire("s", lease, 5)
    assert await broker.acquire("s", lease, 5)  # its own lease: not `busy`
    for _ in range(2):
        await broker.add_turn("s", "user", "hello", "t1:user")
        user = await broker.append("s", {"type": "user", "id": "m", "text": "hello"}, "t1:user")
    await broker.create_session("s")  # never resets a session with events
    assert await broker.last_seq("s") == user.seq == 1
    assert await broker.history("s") == [{"role": "user", "content": "hello"}]
    for _ in range(2):
        await broker.add_turn("s", "assistant", "hi", "t1:assistant")
        assert await broker.finish("s", done_event("m", "stop"), lease)
    assert [e.data["type"] for e in await broker.replay("s", 0)] == ["user", "done"]
    assert [turn["role"] for turn in await broker.history("s")] == ["user", "assistant"]
    assert await broker.lease("s") is None


async def test_release_frees_the_session(broker: Broker) -> None:
    lease = Lease("instance-a", "m", "t1")
    assert await broker.acquire("s", lease, 5)
    await broker.release("s", Lease("instance-a", "m", "someone else"))
    assert await broker.lease("s") == lease
    await broker.release("s", lease)
    assert await broker.lease("s") is None


async def test_an_expired_lease_blocks_until_claimed_then_belongs_to_the_claimant(
    broker: Broker,
) -> None:
    await broker.create_session("s")
    dead = Lease("instance-dead", "m", "t1")
    assert await broker.acquire("s", dead, 0.05)
    await asyncio.sleep(0.1)  # let the lease's deadline pass
    assert not await broker.renew("s", dead, 5)
    assert not await broker.acquire("s", Lease("instance-b", "m2", "t2"), 5)
    claimed = await broker.claim_expired("instance-a", 5)
    assert [(s, lease.owner, lease.msg_id) for s, lease in claimed] == [("s", "instance-a", "m")]
    assert await broker.claim_expired("instance-b", 5) == []
    assert not await broker.finish("s", done_event("m", "interrupted"), dead)
    assert await broker.finish("s", done_event("m", "interrupted"), claimed[0][1])
    assert await broker.acquire("s", Lease("instance-b", "m2", "t2"), 5)


async def test_history_keeps_the_last_turns(broker: Broker) -> None:
    await broker.create_session("s")
    for n in range(6):
        await broker.add_turn("s", "user" if n % 2 == 0 else "assistant", f"turn {n}")
    assert await broker.history("s") == [
        {"role": "user", "content": "turn 2"},
        {"role": "assistant", "content": "turn 3"},
        {"role": "user", "content": "turn 4"},
        {"role": "assistant", "content": "turn 5"},
    ]


async def test_a_turn_for_a_session_that_is_gone_is_dropped(broker: Broker) -> None:
    # A reply's turns are written after its events: the session may have expired (or been
    # evicted) in between. A turn must not bring it back half made: an append would reuse seqs.
    await broker.add_turn("gone", "assistant", "late words", key="k1")
    await broker.add_turn("gone", "assistant", "late words")
    assert await broker.last_seq("gone") is None
    assert await broker.history("gone") == []
    with pytest.raises(SessionExpired):
        await broker.append("gone", delta_event("m", "x"))


async def test_signal_reaches_the_instance(broker: Broker) -> None:
    await broker.signal("instance-a", {"stop": "s", "msg_id": "m"})
    async with asyncio.timeout(5):
        message = await broker.controls.messages.get()  # type: ignore[attr-defined]
    assert message == {"stop": "s", "msg_id": "m"}


async def test_tasks_round_trip(broker: Broker) -> None:
    assert await broker.get_task("t") is None
    await broker.put_task("t", {"session": "s", "msg_id": "m", "seq": 3})
    assert await broker.get_task("t") == {"session": "s", "msg_id": "m", "seq": 3}


async def test_a_subscription_that_is_not_read_overflows_instead_of_growing(
    broker: Broker,
) -> None:
    await broker.create_session("s")
    async with broker.subscribe("s", max_bytes=4096) as slow, broker.subscribe("s") as fast:
        for n in range(200):
            await broker.append("s", delta_event("m", f"chunk {n} " * 3))
        last = await broker.append("s", done_event("m", "stop"))
        assert slow.overflowed.done()
        assert slow.backlog_bytes <= 4096
        # The other subscriber of the session got everything.
        async with asyncio.timeout(5):
            while (await next_event(fast)).seq != last.seq:
                pass
        assert not fast.overflowed.done()


def test_heroku_style_rediss_url_accepts_a_self_signed_certificate() -> None:
    import ssl

    from chatbot.broker.redis import RedisBroker
    from chatbot.settings import Settings

    url = "rediss://:secret@redis.example.com:6380/0?ssl_cert_reqs=none"
    broker = RedisBroker(Settings(redis_url=url))
    connection = broker.pool.make_connection()  # no network: just how it would connect
    assert connection.ssl_context.cert_reqs == ssl.CERT_NONE


async def test_redis_appends_survive_redis_losing_its_scripts(redis_server) -> None:
    """A Redis restart empties its script cache: the calls it refuses (NOSCRIPT) did not run,
    so the broker loads the scripts and sends them again, once each."""
    import redis.asyncio as aioredis

    from chatbot.broker import open_broker
    from chatbot.settings import Settings

    backend = open_broker(Settings(redis_url=redis_server.url))
    await backend.start("instance-a", lambda message: None)
    try:
        await backend.create_session("flushed")
        assert (await backend.append("flushed", delta_event("m", "a"))).seq == 1
        async with aioredis.from_url(redis_server.url) as admin:
            await admin.script_flush()
        async with asyncio.timeout(5):
            appended = await asyncio.gather(
                *(backend.append("flushed", delta_event("m", "b")) for _ in range(3))
            )
        assert sorted(e.seq for e in appended) == [2, 3, 4]
        assert [e.seq for e in await backend.replay("flushed", 0)] == [1, 2, 3, 4]
    finally:
        await backend.close()
