"""Every setting of the service, read once from the environment.

This is the only module that names environment variables. `Settings.from_env()` validates each
value and raises `SettingsError` naming the variable, so a typo fails at start-up, not at the
first chat.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import SettingsError

T = TypeVar("T")
Number = TypeVar("Number", int, float)

SECRETS = frozenset({"OPENAI_API_KEY", "ACCESS_TOKEN", "SECRET_KEY"})

DEFAULT_MODEL = "gpt-4.1-mini"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer concisely."


@dataclass(frozen=True, slots=True)
class Settings:
    """Configuration of one chatbot process. Units are in the names."""

    host: str = "0.0.0.0"
    port: int = 8000
    web_concurrency: int = 1  # processes `chatbot serve` runs (chatbot/workers.py)
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    openai_model: str = DEFAULT_MODEL
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    redis_url: str | None = field(default=None, repr=False)
    redis_max_connections: int = 6
    redis_timeout_s: float = 5.0
    redis_canary_interval_s: float = 2.0
    allowed_origins: tuple[str, ...] = ()
    access_token: str | None = field(default=None, repr=False)
    max_message_chars: int = 4000
    history_turns: int = 20
    upstream_connect_timeout_s: float = 5.0
    upstream_first_token_timeout_s: float = 30.0  # from the request, retries included
    upstream_idle_timeout_s: float = 30.0  # between content pieces
    upstream_max_retries: int = 2  # before the first token only
    upstream_breaker_failures: int = 5
    upstream_breaker_cooldown_s: float = 15.0
    ws_ping_interval_s: float = 20.0
    ws_max_message_bytes: int = 64 * 1024
    ws_idle_timeout_s: float = 90.0
    ws_close_linger_s: float = 30.0  # for a closed socket's client to take what it was sent
    ws_frames_per_s: float = 20.0  # a socket's client frames read per second at most; 0: any
    ws_permessage_deflate: bool = False
    socket_backlog_bytes: int = 1024 * 1024
    session_ttl_s: int = 24 * 3600
    session_log_max_events: int = 5000
    lease_ttl_s: float = 10.0
    shutdown_grace_s: float = 20.0
    max_generations: int = 1000
    rate_limit_session: str = "30/minute"
    rate_limit_ip: str = "120/minute"
    rate_limit_handshakes_ip: str = "300/minute"
    session_token_budget: str = "500000/day"
    ip_token_budget: str = "2000000/day"
    max_replies_per_ip: int = 20
    rate_limit_new_sessions: str = "30/minute"  # sessions stored per client address
    max_sockets_per_ip: int = 100
    max_reply_tokens: int = 4096  # sent upstream as max_tokens; 0: not sent
    max_reply_chars: int = 100_000  # a reply is cut (`done reason=length`) past this many
    max_reply_s: float = 300.0  # ... or when it has streamed this long
    trusted_proxy_hops: int = 0
    max_queued_replies: int = 2000
    demo_word_delay_s: float = 0.06
    log_level: str = "INFO"
    log_format: str = "json"
    # Bringing a Flask app along (docs/migrating.md, chatbot/mount.py).
    wsgi_app: str | None = None  # "module:app" or "module:create_app()"
    wsgi_threads: int = 16
    wsgi_max_body_bytes: int = 16 * 1024 * 1024
    chat_page_path: str = "/"
    secret_key: str | None = field(default=None, repr=False)
    templates_dir: str | None = None
    static_dir: str | None = None

    @property
    def demo(self) -> bool:
        """No OpenAI key and no OpenAI-compatible server: the offline demo model answers."""
        return not self.openai_api_key and not self.openai_base_url

    @property
    def lease_check_interval_s(self) -> float:
        """How often instances look for generations whose owner died (bounded failover)."""
        return max(0.05, self.lease_ttl_s / 4)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `environ` (default `os.environ`); `SettingsError` names a bad variable."""
        env = os.environ if environ is None else environ
        if env.get("UPSTREAM_TIMEOUT_S", "").strip():  # removed: refuse rather than ignore it
            raise SettingsError(
                "UPSTREAM_TIMEOUT_S",
                "is no longer read; set UPSTREAM_CONNECT_TIMEOUT_S, "
                "UPSTREAM_FIRST_TOKEN_TIMEOUT_S and UPSTREAM_IDLE_TIMEOUT_S instead",
            )
        from .broker import BACKENDS  # the broker imports this module

        reader = _Reader(env)
        d = cls()  # the defaults
        settings = cls(
            host=reader.get("HOST", str, d.host),
            port=reader.get("PORT", _port, d.port),
            web_concurrency=reader.get("WEB_CONCURRENCY", _positive(int), d.web_concurrency),
            openai_api_key=reader.get("OPENAI_API_KEY", str, None),
            openai_base_url=reader.get("OPENAI_BASE_URL", _url(("http", "https")), None),
            openai_model=reader.get("OPENAI_MODEL", str, d.openai_model),
            system_prompt=reader.get("SYSTEM_PROMPT", str, d.system_prompt),
            redis_url=reader.get("REDIS_URL", _url(tuple(BACKENDS)), None),
            redis_max_connections=reader.get(
                "REDIS_MAX_CONNECTIONS", _at_least(3), d.redis_max_connections
            ),
            redis_timeout_s=reader.get("REDIS_TIMEOUT_S", _positive(float), d.redis_timeout_s),
            redis_canary_interval_s=reader.get(
                "REDIS_CANARY_INTERVAL_S", _positive(float), d.redis_canary_interval_s
            ),
            allowed_origins=reader.get("ALLOWED_ORIGINS", _origins, ()),
            access_token=reader.get("ACCESS_TOKEN", _secret, None),
            max_message_chars=reader.get("MAX_MESSAGE_CHARS", _positive(int), d.max_message_chars),
            history_turns=reader.get("HISTORY_TURNS", _positive(int), d.history_turns),
            upstream_connect_timeout_s=reader.get(
                "UPSTREAM_CONNECT_TIMEOUT_S", _positive(float), d.upstream_connect_timeout_s
            ),
            upstream_first_token_timeout_s=reader.get(
                "UPSTREAM_FIRST_TOKEN_TIMEOUT_S",
                _positive(float),
                d.upstream_first_token_timeout_s,
            ),
            upstream_idle_timeout_s=reader.get(
                "UPSTREAM_IDLE_TIMEOUT_S", _positive(float), d.upstream_idle_timeout_s
            ),
            upstream_max_retries=reader.get(
                "UPSTREAM_MAX_RETRIES", _non_negative(int), d.upstream_max_retries
            ),
            upstream_breaker_failures=reader.get(
                "UPSTREAM_BREAKER_FAILURES", _positive(int), d.upstream_breaker_failures
            ),
            upstream_breaker_cooldown_s=reader.get(
                "UPSTREAM_BREAKER_COOLDOWN_S", _positive(float), d.upstream_breaker_cooldown_s
            ),
            ws_ping_interval_s=reader.get(
                "WS_PING_INTERVAL_S", _positive(float), d.ws_ping_interval_s
            ),
            ws_permessage_deflate=reader.get("WS_PERMESSAGE_DEFLATE", _bool, False),
            ws_idle_timeout_s=reader.get(
                "WS_IDLE_TIMEOUT_S", _non_negative(float), d.ws_idle_timeout_s
            ),
            ws_close_linger_s=reader.get(
                "WS_CLOSE_LINGER_S", _positive(float), d.ws_close_linger_s
            ),
            ws_frames_per_s=reader.get("WS_FRAMES_PER_S", _non_negative(float), d.ws_frames_per_s),
            ws_max_message_bytes=reader.get(
                "WS_MAX_MESSAGE_BYTES", _positive(int), d.ws_max_message_bytes
            ),
            socket_backlog_bytes=reader.get(
                "SOCKET_BACKLOG_BYTES", _positive(int), d.socket_backlog_bytes
            ),
            session_ttl_s=reader.get("SESSION_TTL_S", _positive(int), d.session_ttl_s),
            session_log_max_events=reader.get(
                "SESSION_LOG_MAX_EVENTS", _positive(int), d.session_log_max_events
            ),
            lease_ttl_s=reader.get("GENERATION_LEASE_S", _positive(float), d.lease_ttl_s),
            max_generations=reader.get("MAX_GENERATIONS", _positive(int), d.max_generations),
            rate_limit_session=reader.get("RATE_LIMIT_SESSION", _rate, d.rate_limit_session),
            rate_limit_ip=reader.get("RATE_LIMIT_IP", _rate, d.rate_limit_ip),
            rate_limit_handshakes_ip=reader.get(
                "RATE_LIMIT_HANDSHAKES_IP", _rate, d.rate_limit_handshakes_ip
            ),
            session_token_budget=reader.get("SESSION_TOKEN_BUDGET", _rate, d.session_token_budget),
            ip_token_budget=reader.get("IP_TOKEN_BUDGET", _rate, d.ip_token_budget),
            max_replies_per_ip=reader.get(
                "MAX_REPLIES_PER_IP", _positive(int), d.max_replies_per_ip
            ),
            rate_limit_new_sessions=reader.get(
                "RATE_LIMIT_NEW_SESSIONS", _rate, d.rate_limit_new_sessions
            ),
            max_reply_tokens=reader.get("MAX_REPLY_TOKENS", _non_negative(int), d.max_reply_tokens),
            max_reply_chars=reader.get("MAX_REPLY_CHARS", _positive(int), d.max_reply_chars),
            max_reply_s=reader.get("MAX_REPLY_S", _positive(float), d.max_reply_s),
            max_sockets_per_ip=reader.get(
                "MAX_SOCKETS_PER_IP", _positive(int), d.max_sockets_per_ip
            ),
            trusted_proxy_hops=reader.get(
                "TRUSTED_PROXY_HOPS", _non_negative(int), d.trusted_proxy_hops
            ),
            max_queued_replies=reader.get(
                "MAX_QUEUED_REPLIES", _non_negative(int), d.max_queued_replies
            ),
            shutdown_grace_s=reader.get(
                "SHUTDOWN_GRACE_S", _non_negative(float), d.shutdown_grace_s
            ),
            demo_word_delay_s=reader.get(
                "DEMO_WORD_DELAY_S", _non_negative(float), d.demo_word_delay_s
            ),
            log_level=reader.get("LOG_LEVEL", _log_level, d.log_level),
            log_format=reader.get("LOG_FORMAT", _log_format, d.log_format),
            wsgi_app=reader.get("WSGI_APP", _app_spec, None),
            wsgi_threads=reader.get("WSGI_THREADS", _positive(int), d.wsgi_threads),
            wsgi_max_body_bytes=reader.get(
                "WSGI_MAX_BODY_BYTES", _positive(int), d.wsgi_max_body_bytes
            ),
            chat_page_path=reader.get("CHAT_PAGE_PATH", _page_path, d.chat_page_path),
            secret_key=reader.get("SECRET_KEY", _secret, None),
            templates_dir=reader.get("TEMPLATES_DIR", _directory, None),
            static_dir=reader.get("STATIC_DIR", _directory, None),
        )
        # JSON-escaped, one character can take 12 bytes (two \uXXXX escapes), plus the envelope.
        needed = settings.max_message_chars * 12 + 256
        if needed > settings.ws_max_message_bytes:
            raise SettingsError(
                "WS_MAX_MESSAGE_BYTES",
                f"must be at least 12 x MAX_MESSAGE_CHARS + 256 ({needed}) so a message of the "
                "allowed length always fits in a frame, however the client escapes it",
            )
        if settings.static_dir and settings.chat_page_path == "/":
            raise SettingsError(
                "STATIC_DIR",
                "is served at /static/, where the chat page's own files are while "
                "CHAT_PAGE_PATH is /: move the chat page (e.g. CHAT_PAGE_PATH=/assistant/)",
            )
        return settings


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._env.get(name, "").strip()
        if not raw:
            return default
        try:
            return parse(raw)
        except ValueError as exc:
            if name in SECRETS:  # a key or token is never echoed, not even a wrong one
                raise SettingsError(name, str(exc)) from None
            raise SettingsError(name, f"{exc} (got {_without_credentials(raw)!r})") from None


def _without_credentials(raw: str) -> str:
    """The value as an error may quote it: a URL's user and password (REDIS_URL) masked."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*:/*)?.*@", lambda m: (m[1] or "") + "***@", raw)


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port, 1-65535")
    return value


def _positive(kind: Callable[[str], Number]) -> Callable[[str], Number]:
    def parse(raw: str) -> Number:
        value = kind(raw)
        if not value > 0:
            raise ValueError("must be greater than 0")
        return value

    return parse


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return parse


def _non_negative(kind: Callable[[str], Number]) -> Callable[[str], Number]:
    def parse(raw: str) -> Number:
        value = kind(raw)
        if value < 0:
            raise ValueError("must not be negative")
        return value

    return parse


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        scheme, sep, rest = raw.partition("://")
        if not sep or scheme.lower() not in schemes or (scheme != "memory" and not rest):
            raise ValueError(
                f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}"
            )
        return raw

    return parse


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise ValueError(f"each origin must be '*' or like https://example.com, not {origin!r}")
    return origins


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError("must be true or false")
    return value in {"true", "1", "yes"}


def _secret(raw: str) -> str:
    if len(raw) < 16:
        raise ValueError("must be at least 16 characters (make it long and random)")
    return raw


def _rate(raw: str) -> str:
    from limits import parse

    try:
        parse(raw)
    except ValueError:
        raise ValueError("must be a rate like 30/minute, 1000/hour or 100000/day") from None
    return raw


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def _log_format(raw: str) -> str:
    value = raw.lower()
    if value not in {"json", "text"}:
        raise ValueError("must be json (one JSON object per line) or text (for people)")
    return value


APP_SPEC = re.compile(r"[A-Za-z_][\w.]*(:[A-Za-z_]\w*(\(.*\))?)?", re.DOTALL)


def _app_spec(raw: str) -> str:
    if not APP_SPEC.fullmatch(raw):
        raise ValueError("must be module:name or module:factory() (as flask --app takes it)")
    return raw


def _page_path(raw: str) -> str:
    if not raw.startswith("/") or any(c in raw for c in "?#<> "):
        raise ValueError("must be a URL path like / or /assistant/")
    return raw.rstrip("/") + "/"


def _directory(raw: str) -> str:
    if not os.path.isdir(raw):
        raise ValueError("must be an existing directory")
    return os.path.abspath(raw)
