"""HTTP routes: the page, the Flask-era `POST /chat` contract, health and readiness."""

from __future__ import annotations

import logging
from typing import Any

from quart import Blueprint, Response, request, send_from_directory

from ..app import WEB_DIR, chat_service, settings
from ..errors import UpstreamError

log = logging.getLogger(__name__)

blueprint = Blueprint("http_api", __name__)

JsonReply = tuple[dict[str, Any], int]


@blueprint.get("/")
async def index() -> Response:
    return await send_from_directory(WEB_DIR, "index.html")


@blueprint.post("/chat")
async def chat() -> JsonReply:
    """`{"message": "..."}` (JSON or form field) -> `{"response": "..."}`; stateless, one turn.

    The contract of the Flask app this service replaced, kept for its clients.
    """
    message = await _message_field()
    if not message or not message.strip():
        return {"error": "Message is required"}, 400
    limit = settings().max_message_chars
    if len(message) > limit:
        return {"error": f"Message is too long ({len(message)} characters; limit {limit})"}, 400
    try:
        return {"response": await chat_service().complete(message)}, 200
    except UpstreamError as exc:
        log.warning("POST /chat failed upstream: %s", exc.code)
        return {"error": exc.message}, 502


@blueprint.get("/healthz")
async def healthz() -> JsonReply:
    """The process is up and its event loop answers."""
    return {"status": "ok"}, 200


@blueprint.get("/readyz")
async def readyz() -> JsonReply:
    """Ready to serve chats: the broker answers. 503 otherwise, so a balancer routes elsewhere."""
    service = chat_service()
    broker = await service.broker.check()
    ready = bool(broker.get("ok"))
    body = {
        "status": "ready" if ready else "unavailable",
        "instance": service.instance,
        "broker": broker,
        "model": service.model.name,
        "demo": service.model.demo,
        "generations": service.generations_in_flight,
    }
    return body, 200 if ready else 503


async def _message_field() -> str | None:
    data = await request.get_json(silent=True)
    if isinstance(data, dict):
        value = data.get("message")
        return value if isinstance(value, str) else None
    form = await request.form
    return form.get("message")
