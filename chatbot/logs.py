"""Logging: one JSON object per line on stdout (LOG_FORMAT=json), or readable text for local dev.

Each line carries, when known, the correlation id of the HTTP request or WebSocket connection it
came from (`request_id`: the balancer's X-Request-ID, which Heroku's router sets, or a new one),
the session (its first 6 characters only: a session id is a bearer credential) and the instance.
The ids live in context variables, so tasks a request starts (a reply's generation) inherit them.
Configured secrets (the OpenAI key, passwords in REDIS_URL or OPENAI_BASE_URL) are replaced by
`***` wherever they would appear, whichever library logged them.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from .settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"
REDACTED = "***"

_request_id: ContextVar[str | None] = ContextVar("chatbot_request_id", default=None)
_session: ContextVar[str | None] = ContextVar("chatbot_session", default=None)
_instance: str | None = None
# What we accept as a caller's correlation id; anything else (too long, spaces, control
# characters) is replaced rather than written into every log line of the request.
_GOOD_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def bind_request(header: str | None = None) -> str:
    """Give the current task (and tasks it starts) a correlation id: `header` (the caller's
    X-Request-ID) when it looks like one, else a new one. Returns the id."""
    request_id = header if header and _GOOD_ID.fullmatch(header) else secrets.token_hex(8)
    _request_id.set(request_id)
    return request_id


def request_id() -> str | None:
    return _request_id.get()


def bind_session(session: str) -> None:
    """Log lines of the current task (and tasks it starts) name this session, shortened."""
    _session.set(session)


def set_instance(instance: str) -> None:
    """Every log line of the process names this instance."""
    global _instance
    _instance = instance


def short_session(session: str) -> str:
    return session[:6] + "…"


def context(record: logging.LogRecord | None = None) -> dict[str, str]:
    """The correlation fields that are set: from the record's `extra`, else the context."""
    fields: dict[str, str] = {}
    session = getattr(record, "session", None) or _session.get()
    if session:
        fields["session"] = short_session(str(session))
    request = getattr(record, "request_id", None) or _request_id.get()
    if request:
        fields["request_id"] = str(request)
    if _instance:
        fields["instance"] = _instance
    return fields


def secret_values(settings: Settings) -> list[str]:
    """The configured values no log line may contain."""
    values = [settings.openai_api_key]
    for url in (settings.redis_url, settings.openai_base_url):
        if url:
            try:
                password = urlsplit(url).password
            except ValueError:
                continue
            values += [password, unquote(password or "")]
    return sorted({v for v in values if v}, key=len, reverse=True)


class _Redacting(logging.Formatter):
    def __init__(self, fmt: str | None = None, *, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self._secrets = [s for s in secrets if s]

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


class JsonFormatter(_Redacting):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, the correlation
    fields that are set, and `exception` (the formatted traceback) when there is one."""

    def __init__(self, *, secrets: Iterable[str] = ()) -> None:
        super().__init__(secrets=secrets)

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, Any] = {
            "time": when.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
            **context(record),
        }
        if record.exc_info:
            entry["exception"] = self.redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = self.redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = self.redact(self.formatStack(record.stack_info))
        return json.dumps(entry, default=str)


class TextFormatter(_Redacting):
    """`time LEVEL logger [session request]: message`, for people reading a terminal."""

    def __init__(self, *, secrets: Iterable[str] = ()) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s", secrets=secrets
        )

    def format(self, record: logging.LogRecord) -> str:
        fields = context(record)
        fields.pop("instance", None)  # one per process: said once at start-up
        # A message carries what clients sent (a path, a header): a line break in it would start
        # a forged log line, an ANSI escape rewrite the terminal. Tracebacks keep their lines.
        record = logging.makeLogRecord(
            {**record.__dict__, "msg": escape_controls(record.getMessage()), "args": None}
        )
        record.context = f" [{' '.join(fields.values())}]" if fields else ""
        return self.redact(super().format(record))


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` with control characters (CR, LF, ESC...) written as Python escapes."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def configure(settings: Settings) -> None:
    """Send every logger's records (ours, Quart's, Hypercorn's, the libraries') to stdout in
    LOG_FORMAT at LOG_LEVEL."""
    hidden = secret_values(settings)
    handler = logging.StreamHandler(sys.stdout)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(secrets=hidden))
    else:
        handler.setFormatter(TextFormatter(secrets=hidden))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    logging.captureWarnings(True)  # `warnings` would print raw lines to stderr
