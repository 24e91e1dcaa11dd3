"""Replies addressed without a socket (the HTTP ask API): a task is a pointer into the session log.

A task record names the session, the user message and its seq; its status and text so far are
read back from the session log, so any instance answers, and a socket on the same session sees
the very same reply stream.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any, Literal, Protocol

from .. import protocol
from ..broker import EventLog, Tasks
from ..errors import SessionExpired
from .service import ChatService

Status = Literal["queued", "running", "done", "error"]


class TaskLog(Tasks, EventLog, Protocol):
    """What a task's status is read from: its record, and the session log it points into."""


async def start_task(
    service: ChatService, session: str | None, text: str, client_ip: str
) -> dict[str, str]:
    """Accept `text` in `session` (a new session when None or unknown); `{"task", "session"}`.

    Raises what `ChatService.submit` raises (`Busy`, `Restarting`, `BrokerUnavailable`).
    """
    accepted = None
    if session is not None:  # submitted at once: the rate limits come before any lookup
        with suppress(SessionExpired):
            accepted = await service.submit(session, text, client_ip=client_ip)
    if session is None or accepted is None:
        session, _ = await service.open_session(None)
        accepted = await service.submit(session, text, client_ip=client_ip)
    task = protocol.new_id()
    record = {"session": session, "msg_id": accepted.data["id"], "seq": accepted.seq}
    await service.broker.put_task(task, record)
    return {"task": task, "session": session}


async def task_status(broker: TaskLog, task: str) -> dict[str, Any] | None:
    """`{"status", "response"}` (plus `"error"` when it failed), or None for an unknown task."""
    record = await broker.get_task(task)
    if record is None:
        return None
    status: Status = "queued"
    parts: list[str] = []
    result: dict[str, Any] = {}
    for event in await broker.replay(record["session"], record["seq"]):
        data = event.data
        if data.get("reply_to") != record["msg_id"]:
            continue
        if data["type"] == "delta":
            status = "running"
            parts.append(data["text"])
        elif data["type"] == "error":
            result["error"] = data["message"]
        elif data["type"] == "done":
            status = "done" if data["reason"] in ("stop", "length", "cancelled") else "error"
            result["reason"] = data["reason"]
            if data["reason"] == "interrupted":
                result.setdefault("error", "The reply was interrupted; ask again.")
    return {"status": status, "response": "".join(parts), **result}
