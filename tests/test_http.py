"""HTTP routes: POST /chat (the Flask-era contract), health and readiness."""

from __future__ import annotations

from chatbot.fake_openai import FakeOpenAI, reply_text
from chatbot.settings import Settings

from .conftest import Socket


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
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    body = await ready.get_json()
    assert body["status"] == "ready"
    assert body["broker"]["backend"] == ("redis" if settings.redis_url else "memory")
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
