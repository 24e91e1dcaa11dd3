"""The chat page, its files and the Flask-era `POST /chat`, under CHAT_PAGE_PATH (default `/`).

Moving them (e.g. `CHAT_PAGE_PATH=/assistant/`) gives `/`, `/chat` and `/static/` back to your
own routes or to the mounted legacy app (docs/migrating.md); the socket stays at `/ws`.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, send_from_directory

from . import http_api
from .access import token_required

_PACKAGE = Path(__file__).resolve().parents[1]
# Installed wheels carry the client inside the package; a source checkout has it beside it.
WEB_DIR = next((p for p in (_PACKAGE / "web", _PACKAGE.parent / "web") if p.is_dir()), _PACKAGE)


def blueprint(path: str) -> Blueprint:
    """The page at `path` (ending in `/`), its files at `{path}static/`, `POST {path}chat`."""
    page = Blueprint(
        "chat_page",
        __name__,
        static_folder=str(WEB_DIR),
        static_url_path="/static",
        url_prefix=path.rstrip("/") or None,
    )
    page.add_url_rule("/", "index", index)
    page.add_url_rule("/chat", "chat", token_required(http_api.chat), methods=["POST"])
    return page


# `frame-ancestors` only works as a header (a <meta> CSP ignores it): no other site may frame the
# page and trick its user into clicking in it. X-Frame-Options for browsers without CSP 2.
FRAMING_HEADERS = {
    "Content-Security-Policy": "frame-ancestors 'self'",
    "X-Frame-Options": "SAMEORIGIN",
}


async def index() -> Response:
    response = await send_from_directory(WEB_DIR, "index.html")
    response.headers.update(FRAMING_HEADERS)
    return response
