"""The WebSocket wire protocol: frame types, parsing of client frames, encoding of server frames.

Everything that knows the JSON shape of a frame lives here; docs/protocol.md is its prose twin.
Client frames are parsed and validated in one place (`parse_client_frame`); a bad frame raises a
`ClientError` whose message says what was expected and what came.
"""

from __future__ import annotations

import _json
import json
import re
import secrets
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, Literal

from .errors import FrameError, Refusal, TooLong

MAX_CLIENT_ID_CHARS: Final = 64
# The ids the server issues (sessions, tasks) are 22 URL-safe characters (`new_id`); this is what
# one may look like when a client hands it back. Anything else is refused where it comes in,
# before it reaches a Redis key: no lookup is made for an id that cannot be ours.
_SERVER_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")

DoneReason = Literal["stop", "length", "cancelled", "error", "interrupted"]


class CloseCode(IntEnum):
    """WebSocket close codes the server uses (RFC 6455, section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013


@dataclass(frozen=True, slots=True)
class SendMessage:
    """`{"type": "message", "id"?: str, "text": str}`: the user says something."""

    text: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """`{"type": "stop"}`: stop the reply that is streaming in this session, if any."""


@dataclass(frozen=True, slots=True)
class Ping:
    """`{"type": "ping"}`: a heartbeat; answered with `{"type": "pong"}`. A socket that sends
    nothing for WS_IDLE_TIMEOUT_S is taken for dead and closed (1008)."""


ClientFrame = SendMessage | Stop | Ping

_FIELDS: Final[dict[str, frozenset[str]]] = {
    "message": frozenset({"type", "id", "text"}),
    "stop": frozenset({"type"}),
    "ping": frozenset({"type"}),
}


def parse_client_frame(raw: str | bytes, *, max_chars: int) -> ClientFrame:
    """Parse one client frame or raise `FrameError`/`TooLong` saying what was wrong."""
    if isinstance(raw, bytes):
        raise FrameError(
            "binary frames are not supported; send JSON text frames", code="unsupported_binary"
        )
    try:
        data = json.loads(raw)
    except ValueError:
        raise FrameError(
            f"expected a JSON object, got text that is not JSON: {_preview(raw)}",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise FrameError(f"expected a JSON object, got {_json_kind(data)}")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise FrameError(
            f'expected "type" to be one of {sorted(_FIELDS)}, got {json.dumps(kind)[:40]}',
            code="unknown_type",
        )
    unknown = set(data) - _FIELDS[kind]
    if unknown:
        raise FrameError(
            f"unknown field(s) {sorted(unknown)} in a {kind!r} frame; "
            f"allowed: {sorted(_FIELDS[kind])}"
        )
    if kind == "stop":
        return Stop()
    if kind == "ping":
        return Ping()
    client_id = data.get("id")
    if client_id is not None and (
        not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_CLIENT_ID_CHARS
    ):
        raise FrameError(
            f'expected "id" to be a string of 1-{MAX_CLIENT_ID_CHARS} characters, '
            f"got {_json_kind(client_id)}"
        )
    if client_id is not None and has_lone_surrogate(client_id):
        raise FrameError(f'expected "id" to be Unicode text, got {_LONE_SURROGATE}')
    if client_id is not None and not client_id.isprintable():
        raise FrameError('expected "id" to be printable text, got control characters')
    text = data.get("text")
    if not isinstance(text, str):
        raise FrameError(f'expected "text" to be a string, got {_json_kind(text)}', ref=client_id)
    check_text(text, max_chars, ref=client_id)
    return SendMessage(text=text, id=client_id)


def check_text(text: str, max_chars: int, *, ref: str | None = None) -> None:
    """The rules for a user message's text, on every route: Unicode, not blank, not too long.
    Raises `FrameError` (code `invalid_frame` or `empty`) or `TooLong`."""
    if has_lone_surrogate(text):
        raise FrameError(f'expected "text" to be Unicode text, got {_LONE_SURROGATE}', ref=ref)
    if not text.strip():
        raise FrameError("the message text is empty", code="empty", ref=ref)
    if len(text) > max_chars:
        raise TooLong(f"the message has {len(text)} characters; the limit is {max_chars}", ref=ref)


def check_id(value: object, what: str) -> str:
    """`value` when it can be an id the server issued (a session, a task), else `FrameError`
    saying what came: 1-64 letters, digits, `-` or `_`."""
    if isinstance(value, str) and _SERVER_ID.fullmatch(value):
        return value
    got = f"{len(value)} characters" if isinstance(value, str) else _json_kind(value)
    if isinstance(value, str) and len(value) <= MAX_CLIENT_ID_CHARS:
        got = "other characters" if not has_lone_surrogate(value) else _LONE_SURROGATE
    raise FrameError(
        f"expected {what} to be an id this service issued (1-{MAX_CLIENT_ID_CHARS} letters, "
        f"digits, '-' or '_'), got {got}"
    )


def new_id() -> str:
    """An unguessable identifier (128 random bits, URL-safe) for sessions, messages, tasks."""
    return secrets.token_urlsafe(16)


# One C encoder, made once, for every frame: `json.dumps` with options builds a new
# `JSONEncoder` on each call, and `JSONEncoder.encode` a new C encoder, a closure and a dict of
# markers (frames are built here and never circular). Compact, and UTF-8 left unescaped.
_ENCODE: Final = _json.make_encoder(
    None, json.JSONEncoder().default, _json.encode_basestring, None, ":", ",", False, False, True
)


def encode(frame: dict[str, Any]) -> str:
    """Encode a server frame once; the text is shared by every socket that receives it."""
    return "".join(_ENCODE(frame, 0))


PONG: Final = '{"type":"pong"}'


def ready(session: str, seq: int, model: str, demo: bool, epoch: str) -> dict[str, Any]:
    return {
        "type": "ready",
        "session": session,
        "seq": seq,
        "epoch": epoch,
        "model": model,
        "demo": demo,
    }


def resync(epoch: str, seq: int) -> dict[str, Any]:
    """The server lost data (a new `epoch`): forget this session's events; the whole log, up to
    `seq` and on, follows from seq 1."""
    return {"type": "resync", "epoch": epoch, "seq": seq}


def queued(reply_to: str, position: int) -> dict[str, Any]:
    """The reply waits for a free slot (admission control); not logged, so no seq."""
    return {"type": "queued", "reply_to": reply_to, "position": position}


def error(
    code: str, message: str, ref: str | None = None, retry_after_s: int | None = None
) -> dict[str, Any]:
    """A per-socket problem (no seq). `id` names the client's message it concerns, if any;
    `retry_after` (seconds) says when trying again may succeed."""
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if ref is not None:
        frame["id"] = ref
    if retry_after_s is not None:
        frame["retry_after"] = retry_after_s
    return frame


def refusal(answer: Refusal) -> dict[str, Any]:
    """The error frame of a refused client request (`errors.refusal`: the code and message
    the HTTP routes give too)."""
    return error(answer.code, answer.message, answer.ref, answer.retry_after_s)


# Conversation events. The broker adds "seq" when it appends them to the session log.


def user_event(msg_id: str, text: str) -> dict[str, Any]:
    return {"type": "user", "id": msg_id, "text": text}


def delta_event(reply_to: str, text: str) -> dict[str, Any]:
    return {"type": "delta", "reply_to": reply_to, "text": text}


def done_event(reply_to: str, reason: DoneReason) -> dict[str, Any]:
    return {"type": "done", "reply_to": reply_to, "reason": reason}


def reply_error_event(reply_to: str, code: str, message: str) -> dict[str, Any]:
    """The readable error of a failed reply; logged, so every socket and every resume sees it."""
    return {"type": "error", "reply_to": reply_to, "code": code, "message": message}


_LONE_SURROGATE = 'a string with a lone surrogate (an unpaired "\\ud800"-"\\udfff" escape)'


def has_lone_surrogate(text: str) -> bool:
    """JSON may escape half of a UTF-16 pair ("\\ud800"); no UTF-8 encoder accepts the result.
    Stored, such a string would close every socket sent it (1011) and fail every model request
    that carries the session's history."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _preview(text: str, limit: int = 40) -> str:
    return json.dumps(text if len(text) <= limit else text[:limit] + "…", ensure_ascii=False)


def _json_kind(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null/nothing"
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number"
