"""HTTP routes: the Flask-era `POST /chat` contract (served under CHAT_PAGE_PATH by
`routes.page`), the ask API, health and readiness."""

from __future__ import annotations

import logging

from quart import Blueprint, Response, request

from .. import descriptors, metrics, protocol
from ..chat.tasks import start_task, task_status
from ..errors import ChatbotError, ClientError, UpstreamError
from ..runtime import runtime
from .access import JsonReply, access_refusal, refused, request_ip

log = logging.getLogger(__name__)

blueprint = Blueprint("http_api", __name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@blueprint.before_request
async def require_access_token() -> JsonReply | None:
    """The chat endpoints need ACCESS_TOKEN when one is set; the health checks do not."""
    if request.path in OPEN_PATHS:
        return None
    return await access_refusal(limit=False)


async def chat() -> JsonReply:
    """`{"message": "..."}` (JSON or form field) -> `{"response": "..."}`; stateless, one turn.

    The contract of the Flask app this service replaced, kept for its clients.
    """
    message, refusal = await _message()
    if refusal is not None:
        return refusal
    service = runtime().service
    try:
        await service.limits.check_message(None, request_ip())
        return {"response": await service.complete(message)}, 200
    except ChatbotError as exc:
        if isinstance(exc, UpstreamError):
            metrics.upstream_error(exc.code)
        return refused(exc)


@blueprint.post("/api/ask")
async def ask() -> JsonReply:
    """`{"message", "session"?}` -> 202 `{"task", "session"}` at once; the reply streams into the
    session (sockets on it see it) and `GET /api/tasks/ID` reads it back from any instance."""
    message, refusal = await _message()
    if refusal is not None:
        return refusal
    data = await request.get_json(silent=True)
    session = (data.get("session") if isinstance(data, dict) else None) or None
    try:
        if session is not None:
            protocol.check_id(session, "session")
        return await start_task(runtime().service, session, message, request_ip()), 202
    except ChatbotError as exc:  # SessionExpired: it expired, or Redis lost it, meanwhile
        return refused(exc)


@blueprint.get("/api/tasks/<task>")
async def task(task: str) -> JsonReply:
    try:
        protocol.check_id(task, "the task")
        status = await task_status(runtime().service.broker, task)
    except ChatbotError as exc:
        return refused(exc, "The service cannot read tasks right now; try again.")
    if status is None:
        return {"error": "No such task (it may have expired)."}, 404
    return status, 200


@blueprint.get("/healthz")
async def healthz() -> JsonReply:
    """The process is up and its event loop answers."""
    return {"status": "ok"}, 200


@blueprint.get("/metrics")
async def prometheus_metrics() -> Response:
    """This instance's metrics in the Prometheus text format (`chatbot.metrics`)."""
    return Response(metrics.scrape(), content_type=metrics.CONTENT_TYPE)


@blueprint.get("/readyz")
async def readyz() -> JsonReply:
    """Ready to serve chats: the broker answers and the instance is not draining for a restart.
    503 otherwise, so a balancer routes elsewhere.

    The model service's state (`upstream`) is reported but never makes this 503: every instance
    shares the one upstream, so failing readiness would take the whole site down, page included.
    """
    service = runtime().service
    broker = await service.broker.check()
    fds = descriptors.check()
    ready = bool(broker.get("ok")) and not service.draining and not (fds and fds["exhausted"])
    body = {
        "status": "draining" if service.draining else "ready" if ready else "unavailable",
        "instance": service.instance,
        "broker": broker,
        "descriptors": fds,
        "model": service.model.name,
        "demo": service.model.demo,
        "generations": service.generations_in_flight,
        "upstream": service.model.upstream_status(),
    }
    return body, 200 if ready else 503


async def _message() -> tuple[str, JsonReply | None]:
    """The request's `message` (JSON or form field), or the 400 that refuses it."""
    data = await request.get_json(silent=True)
    if isinstance(data, dict):
        value = data.get("message")
        message = value if isinstance(value, str) else None
    else:
        message = (await request.form).get("message")
    if not message:
        return "", ({"error": "Message is required"}, 400)
    try:
        protocol.check_text(message, runtime().settings.max_message_chars)
    except ClientError as exc:
        # A blank message keeps the Flask contract's wording; the rest say what was wrong.
        return "", ({"error": "Message is required" if exc.code == "empty" else exc.message}, 400)
    return message, None
