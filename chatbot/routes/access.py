"""ACCESS_TOKEN: an optional shared secret that guards the chat endpoints of a private deployment.

Browsers cannot set headers on a WebSocket, so `/ws` also takes it as `?token=`; HTTP clients send
`Authorization: Bearer <token>`. The page, the static files and the health endpoints stay open.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def token_ok(expected: str | None, headers: Mapping[str, str], args: Mapping[str, str]) -> bool:
    """True when no token is configured, or the request carries it (compared in constant time)."""
    if not expected:
        return True
    scheme, _, credentials = headers.get("Authorization", "").partition(" ")
    offered = credentials.strip() if scheme.lower() == "bearer" else args.get("token", "")
    return hmac.compare_digest(offered.encode(), expected.encode())
