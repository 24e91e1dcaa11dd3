"""Session ids that name a session before it is stored.

A session is stored with its first message, not when a socket opens it (issue #13: a flood of
handshakes, each storing a session for SESSION_TTL_S, filled Redis). Until then its id must
still work on every instance, for a second socket (another tab, a reconnect) to join it. So
the id says it was issued here, and when, without anything stored: 22 random URL-safe
characters, the time it was issued, and a MAC of both under the secret all instances share
(`Broker.secret`). An id that is unknown to the broker but carries a valid MAC, issued less than
SESSION_TTL_S ago (less the second by which a session may expire early: `expiry_slack_s`), is a
session nobody has written to yet: it cannot have expired, since a session expires no sooner
than that after its last event. Anything else unknown is not ours, or expired: the client gets a
new session.
"""

from __future__ import annotations

import base64
import hmac
import time
from typing import Final

from .. import protocol
from ..broker import Secrets, expiry_slack_s

_RANDOM: Final = 22  # characters of protocol.new_id()
_TIME: Final = 6  # the issue time, whole seconds, 32 bits
_MAC: Final = 11  # 64 bits
LENGTH: Final = _RANDOM + _TIME + _MAC


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


async def _mac(broker: Secrets, text: str) -> str:
    return _b64(hmac.digest(await broker.secret(), text.encode(), "sha256")[:8])


async def new_session_id(broker: Secrets) -> str:
    issued = _b64(int(time.time()).to_bytes(4, "big"))
    unsigned = protocol.new_id() + issued
    return unsigned + await _mac(broker, unsigned)


async def issued_unstored(broker: Secrets, session: str, ttl_s: float) -> bool:
    """Whether `session` (unknown to the broker) is an id this service issued within `ttl_s`
    (less `expiry_slack_s`)."""
    if len(session) != LENGTH:
        return False
    unsigned = session[: _RANDOM + _TIME]
    if not hmac.compare_digest(session[-_MAC:], await _mac(broker, unsigned)):
        return False
    issued = int.from_bytes(base64.urlsafe_b64decode(unsigned[_RANDOM:] + "=="), "big")
    return 0 <= time.time() - issued < ttl_s - expiry_slack_s(ttl_s)
