"""The service's exceptions: one small hierarchy, each carrying what a caller needs to report it."""

from __future__ import annotations

from dataclasses import dataclass


class ChatbotError(Exception):
    """Base class of every error the service raises on purpose."""


class SettingsError(ChatbotError):
    """An environment variable has a value the service cannot use."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable} {problem}")
        self.variable = variable
        self.problem = problem


class ClientError(ChatbotError):
    """Something a client sent or asked for that we refuse; becomes an `error` frame or a 4xx.

    `code` is the stable slug clients match on; `message` is for people.
    """

    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        ref: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.ref = ref  # the client's message id, when the error is about one message
        self.retry_after_s = retry_after_s  # when trying again may succeed
        if code is not None:
            self.code = code


class FrameError(ClientError):
    """A frame that is not valid protocol: not JSON, wrong shape, unknown type or field."""

    code = "invalid_frame"


class TooLong(ClientError):
    code = "too_long"


class Busy(ClientError):
    """The session already has a reply streaming (on this or any other instance)."""

    code = "busy"


class RateLimited(ClientError):
    """Over an abuse limit; `scope` says which (session, ip, budget, sockets)."""

    code = "rate_limited"

    def __init__(self, message: str, *, scope: str, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.scope = scope


class Overloaded(ClientError):
    """This instance has as many replies streaming and waiting as it accepts."""

    code = "overloaded"


class SessionExpired(ClientError):
    """The session was idle past SESSION_TTL_S (or its store lost it); start a new one."""

    code = "session_expired"


class Restarting(ClientError):
    """This instance is shutting down; the client should reconnect (to another instance)."""

    code = "restarting"


class UpstreamError(ChatbotError):
    """The model service failed. `code` is a stable slug; `message` is safe to show a user.

    A provider says what it knows of a failed request; the resilience layer decides what to do
    with it (`llm/resilient.py`): `retryable`, whether sending the same request again may
    succeed (only those are retried); `retry_in_s`, how long the service asked us to wait
    before that (its `Retry-After`); `status`, the HTTP status it answered with, for the log.
    """

    retry_after_s: int | None = None  # told to the client: when the service is known to be back

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = True,
        retry_in_s: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_in_s = retry_in_s
        self.status = status


class CircuitOpen(UpstreamError):
    """The model service has failed repeatedly; replies fail at once, without calling it, until
    `retry_after_s` has passed (see `chatbot/llm/breaker.py`)."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            "upstream_unavailable",
            f"The model service is down. Try again in {retry_after_s} s.",
        )
        self.retry_after_s = retry_after_s


class BrokerUnavailable(ChatbotError):
    """The shared state backend (Redis) cannot be reached right now."""


class EpochChanged(BrokerUnavailable):
    """Redis's data is not the data this instance last saw (it restarted empty, was restored
    from an older snapshot, or failed over to a lagging replica): a new epoch began, and the
    call did not run. `epoch` is the new one."""

    def __init__(self, epoch: str) -> None:
        super().__init__(f"redis began a new epoch ({epoch}): its data is not what was seen")
        self.epoch = epoch


# What a client is told about each error, on every HTTP route and on the socket: the most
# specific class of the error names its HTTP status; the socket's `error` frame carries the
# same code and message (docs/protocol.md).
STATUSES: dict[type[ChatbotError], int] = {
    RateLimited: 429,
    Busy: 409,
    SessionExpired: 410,
    Restarting: 503,  # the client reconnects, through the balancer, elsewhere
    Overloaded: 503,
    ClientError: 400,  # FrameError, TooLong
    CircuitOpen: 503,  # down for a while: not this request's fault
    UpstreamError: 502,
    BrokerUnavailable: 503,
    ChatbotError: 500,
}

# A `BrokerUnavailable` carries Redis's words, not a user's: each caller says what it could not do.
CANNOT_ACCEPT = "The service cannot accept messages right now; try again."


@dataclass(frozen=True, slots=True)
class Refusal:
    """An error as a client sees it: an HTTP `status` with `{"error": message}` (and
    `Retry-After`), or an `error` frame with `code`, `message`, `id` (`ref`) and `retry_after`."""

    status: int
    code: str
    message: str
    ref: str | None = None
    retry_after_s: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}

    @property
    def serious(self) -> bool:
        """Worth a warning in the log (abuse, or the service failing), not an info line."""
        return self.status == 429 or self.status >= 500


def refusal(
    exc: ChatbotError, *, ref: str | None = None, unavailable: str = CANNOT_ACCEPT
) -> Refusal:
    """`exc` as a client sees it, from the one table `STATUSES`. `ref` names the client's
    message when `exc` does not; `unavailable` says what a `BrokerUnavailable` prevented."""
    status = next(STATUSES[cls] for cls in type(exc).__mro__ if cls in STATUSES)
    if isinstance(exc, ClientError):
        return Refusal(status, exc.code, exc.message, exc.ref, exc.retry_after_s)
    if isinstance(exc, UpstreamError):
        return Refusal(status, exc.code, exc.message, ref, exc.retry_after_s)
    if isinstance(exc, BrokerUnavailable):
        return Refusal(status, "unavailable", unavailable, ref)
    return Refusal(status, "internal_error", "internal error", ref)
