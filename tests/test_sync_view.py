"""Flask-style synchronous views still work on the Quart app: Quart runs them in a thread pool."""

from __future__ import annotations

import asyncio
import threading

from quart import request

from chatbot.app import create_app
from chatbot.settings import Settings

CALL_TIMEOUT_S = 10.0


async def test_a_sync_view_runs_in_a_worker_thread_and_still_sees_the_request() -> None:
    threads: dict[str, int] = {}

    def greet() -> dict[str, str]:  # a plain `def`, as Flask users wrote views
        threads["sync"] = threading.get_ident()
        return {"greeting": f"hello {request.args.get('name', 'stranger')}"}

    def add() -> tuple[dict[str, int], int]:
        threads["sync-route"] = threading.get_ident()
        return {"sum": request.args.get("a", 0, int) + request.args.get("b", 0, int)}, 201

    async def where() -> dict[str, bool]:
        threads["async"] = threading.get_ident()
        return {"ok": True}

    app = create_app(Settings())
    app.add_url_rule("/greet", view_func=greet)
    app.route("/add")(add)
    app.add_url_rule("/where", view_func=where)

    async with app.test_app() as test_app, asyncio.timeout(CALL_TIMEOUT_S):
        client = test_app.test_client()
        greeted = await client.get("/greet", query_string={"name": "Ada"})
        added = await client.get("/add?a=2&b=3")
        located = await client.get("/where")

    assert greeted.status_code == 200
    assert greeted.content_type == "application/json"
    assert await greeted.get_json() == {"greeting": "hello Ada"}
    assert added.status_code == 201
    assert await added.get_json() == {"sum": 5}
    assert located.status_code == 200
    loop_thread = threading.get_ident()  # the test runs on the event loop's thread
    assert threads["async"] == loop_thread
    assert threads["sync"] != loop_thread
    assert threads["sync-route"] != loop_thread
