"""Admission control: a cap on replies streaming at once, a bounded queue, `overloaded` beyond."""

from __future__ import annotations

from chatbot.fake_openai import FakeOpenAI, reply_text
from chatbot.runtime import runtime_of

from .conftest import ready_sockets, text_of


async def test_beyond_the_cap_replies_queue_then_are_served_and_beyond_the_queue_refused(
    app_with, settings, fake: FakeOpenAI
) -> None:
    fake.configure(chunks=10, interval_ms=30)
    async with app_with(settings.replace(max_generations=1, max_queued_replies=1)) as app:
        async with ready_sockets(app, 3) as (a, b, c):
            await a.send({"type": "message", "text": "first"})
            first = await a.until(lambda f: f["type"] == "delta")
            await b.send({"type": "message", "id": "second", "text": "second"})
            waiting = await b.until(lambda f: f["type"] == "queued")
            assert waiting[-1] == {"type": "queued", "reply_to": "second", "position": 1}
            await c.send({"type": "message", "id": "third", "text": "third"})
            refused = await c.recv()
            assert (refused["code"], refused["id"]) == ("overloaded", "third")
            assert "seq" not in refused
            assert text_of(first + await a.until_done()) == reply_text("first", 10)
            served = await b.until_done()
            assert served[-1]["reason"] == "stop"
            assert text_of(served) == reply_text("second", 10)
            # The refused message left no trace, and its session works once there is room.
            await c.send({"type": "message", "text": "third again"})
            again = await c.until_done()
            assert again[0]["seq"] == 1
    assert [r["messages"][-1]["content"] for r in fake.requests] == [
        "first",
        "second",
        "third again",
    ]


async def test_stop_while_queued_leaves_the_queue_without_calling_the_model(
    app_with, settings, fake: FakeOpenAI
) -> None:
    fake.configure(chunks=20, interval_ms=30)
    async with app_with(settings.replace(max_generations=1, max_queued_replies=5)) as app:
        async with ready_sockets(app, 2) as (a, b):
            await a.send({"type": "message", "text": "busy"})
            await a.until(lambda f: f["type"] == "delta")
            await b.send({"type": "message", "text": "patient"})
            await b.until(lambda f: f["type"] == "queued")
            await b.send({"type": "stop"})
            stopped = await b.until_done()
            assert stopped[-1]["reason"] == "cancelled"
            await a.until_done()
            await b.send({"type": "message", "text": "now"})
            assert (await b.until_done())[-1]["reason"] == "stop"
        service = runtime_of(app.app).service
        assert (service.admission.active, service.admission.queued) == (0, 0)
    assert [r["messages"][-1]["content"] for r in fake.requests] == ["busy", "now"]
