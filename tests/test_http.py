"""HTTP routes: POST /chat (the Flask-era contract), health and readiness."""

from __future__ import annotations

import asyncio

from chatbot.fake_openai import FakeOpenAI, reply_text
from chatbot.settings import Settings

from .conftest import Socket
from .support.waiting import wait_until


async def test_chat_answers_one_stateless_turn(app, fake: FakeOpenAI) -> None:
    client = app.test_client()
    for _ in range(2):
        response = await client.post("/chat", json={"message": "hi"})
        assert response.status_code == 200
        assert await response.get_json() == {"response": reply_text("hi", 5)}
    assert len(fake.requests[1]["messages"]) == 2  # system + this message: no history


async def test_chat_refuses_a_too_long_message(app) -> None:
    response = await app.test_client().post("/chat", json={"message": "x" * 4001})
    assert response.status_code == 400
    assert "4000" in (await response.get_json())["error"]


async def test_chat_reports_upstream_failure_as_502(app) -> None:
    response = await app.test_client().post("/chat", json={"message": "[[fake:status=503]] hi"})
    assert response.status_code == 502
    body = await response.get_json()
    assert set(body) == {"error"}
    assert "503" in body["error"]


async def test_health_and_readiness(app, settings: Settings) -> None:
    client = app.test_client()
    health = await client.get("/healthz")
    assert health.status_code == 200

    async def ready_now() -> bool:  # Redis mode: ready once the pub/sub subscription is confirmed
        return (await client.get("/readyz")).status_code == 200

    await wait_until(ready_now, timeout_s=10)
    ready = await client.get("/readyz")
    body = await ready.get_json()
    assert body["status"] == "ready"
    scheme = settings.redis_url.partition("://")[0] if settings.redis_url else None
    expected = {None: "memory", "redis": "redis", "redis+cluster": "redis-cluster"}[scheme]
    assert body["broker"]["backend"] == expected
    assert body["demo"] is False


async def test_demo_mode_without_any_model_configuration(app_with) -> None:
    async with app_with(Settings(demo_word_delay_s=0)) as app:
        client = app.test_client()
        body = await (await client.post("/chat", json={"message": "hello"})).get_json()
        assert "Demo mode" in body["response"]
        assert "hello" in body["response"]
        async with client.websocket("/ws") as raw:
            ready = await Socket(raw).recv()
            assert ready["demo"] is True
            assert ready["model"] == "demo"


async def test_the_page_is_served(app) -> None:
    response = await app.test_client().get("/")
    assert response.status_code == 200
    assert response.content_type.startswith("text/html")


async def test_the_page_is_revalidated_not_cached_for_hours(app) -> None:
    response = await app.test_client().get("/")
    assert "max-age" not in response.headers.get("Cache-Control", "")
    assert response.headers.get("ETag")


async def test_ask_answers_202_at_once_and_the_task_reads_back_the_reply(
    app, fake: FakeOpenAI
) -> None:
    fake.configure(chunks=6, interval_ms=20)
    client = app.test_client()
    accepted = await client.post("/api/ask", json={"message": "by http"})
    assert accepted.status_code == 202
    body = await accepted.get_json()
    assert set(body) == {"task", "session"}
    reply, statuses = await poll_task(client, body["task"])
    assert reply == {"status": "done", "response": reply_text("by http", 6), "reason": "stop"}
    assert statuses <= {"queued", "running", "done"}


async def test_ask_rides_on_the_session_a_socket_watches(app, fake: FakeOpenAI) -> None:
    client = app.test_client()
    async with client.websocket("/ws") as raw:
        ws = Socket(raw)
        session = (await ws.recv())["session"]
        accepted = await client.post("/api/ask", json={"message": "hi", "session": session})
        assert (await accepted.get_json())["session"] == session
        frames = await ws.until_done()
        busy = await client.post("/api/ask", json={"message": "again", "session": session})
    assert frames[0]["type"] == "user" and frames[0]["text"] == "hi"
    assert "".join(f["text"] for f in frames if f["type"] == "delta") == reply_text("hi", 5)
    assert busy.status_code == 202  # the first reply is done, so the session is free


async def test_ask_is_busy_while_the_session_streams(app, fake: FakeOpenAI) -> None:
    fake.configure(chunks=50, interval_ms=20)
    client = app.test_client()
    first = await (await client.post("/api/ask", json={"message": "long"})).get_json()
    second = await client.post("/api/ask", json={"message": "x", "session": first["session"]})
    assert second.status_code == 409
    assert "error" in await second.get_json()


async def test_ask_reports_upstream_errors_in_the_task(app) -> None:
    client = app.test_client()
    accepted = await client.post("/api/ask", json={"message": "[[fake:status=500]] x"})
    reply, _ = await poll_task(client, (await accepted.get_json())["task"])
    assert reply["status"] == "error"
    assert "500" in reply["error"]


async def test_ask_refuses_bad_input_and_unknown_tasks(app) -> None:
    client = app.test_client()
    assert (await client.post("/api/ask", json={})).status_code == 400
    assert (await client.post("/api/ask", json={"message": "x" * 5000})).status_code == 400
    bad_session = await client.post("/api/ask", json={"message": "x", "session": 5})
    assert bad_session.status_code == 400
    assert (await client.get("/api/tasks/nope")).status_code == 404


async def poll_task(client, task: str) -> tuple[dict, set[str]]:
    """Poll a task as an HTTP client of the ask API does, until it has finished."""
    statuses = set()
    async with asyncio.timeout(5):
        while True:
            reply = await (await client.get(f"/api/tasks/{task}")).get_json()
            statuses.add(reply["status"])
            if reply["status"] in ("done", "error"):
                return reply, statuses
            await asyncio.sleep(0.01)
