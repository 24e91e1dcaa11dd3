"""The in-process broker's logs stay out of the cyclic GC's way."""

from __future__ import annotations

import gc

from chatbot.broker.memory import MemoryBroker

EVENTS = 5000


async def test_logged_events_leave_the_collectors_view_after_one_young_collection() -> None:
    """What a log holds is untracked once a young collection has seen it, so the middle and
    full collections, whose pauses grew with every event held, never scan it again."""
    broker = MemoryBroker(history_turns=20, log_max_events=EVENTS, session_ttl_s=3600)
    await broker.create_session("s")
    gc.collect()
    tracked = len(gc.get_objects())
    for k in range(EVENTS):
        await broker.append("s", {"type": "delta", "reply_to": "m1", "text": f"word{k} "})
    gc.collect(0)
    assert len(gc.get_objects()) - tracked < EVENTS / 50  # on a dataclass per event: 5,000
    replayed = await broker.replay("s", EVENTS - 2)
    assert [(e.seq, e.data) for e in replayed] == [
        (k, {"type": "delta", "seq": k, "reply_to": "m1", "text": f"word{k - 1} "})
        for k in (EVENTS - 1, EVENTS)
    ]
