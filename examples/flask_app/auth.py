"""What the Quart port needs of Flask-Login, written against `quart.session`.

Flask-Login reads `flask.session` and `flask.request` synchronously; on Quart it needs the
Quart-Flask-Patch package, which cannot run here: it swaps the `flask` module for Quart in the
whole process (the mounted Flask app would break) and asyncio's C tasks for Python ones, and it
refuses uvloop. This stands in for the four calls the app uses and keeps Flask-Login's session
keys, so one login works on both sides while routes move (docs/migrating.md).
"""

from collections.abc import Awaitable, Callable
from functools import wraps
from hashlib import sha512
from typing import Any

from quart import flash, jsonify, redirect, request, session, url_for
from users import USERS


def login_user(name: str) -> None:
    session["_user_id"] = name
    session["_fresh"] = True
    session["_id"] = _identifier()


def logout_user() -> None:
    for key in ("_user_id", "_fresh", "_id"):
        session.pop(key, None)


def current_user() -> str | None:
    protect_session()
    name = session.get("_user_id")
    return name if name in USERS else None


def login_required(view: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @wraps(view)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        if current_user() is not None:
            return await view(*args, **kwargs)
        if request.path.startswith("/api/"):
            return jsonify(error="log in first"), 401
        await flash("Please log in to see this page.")
        return redirect(url_for(".login", next=request.path))

    return guarded


def protect_session() -> dict[str, Any]:
    """Flask-Login's "basic" session protection, which it runs whenever it loads the user (a
    view, a template): a session that came from another address or browser is no longer
    fresh. Also a template context processor, as Flask-Login's is."""
    if session and session.get("_id") != _identifier() and session.get("_fresh") is not False:
        session["_fresh"] = False
    return {}


def _identifier() -> str:
    """Flask-Login's session identifier (its `_create_identifier`), byte for byte."""
    address = request.headers.get("X-Forwarded-For", request.remote_addr)
    if address is not None:
        address = address.encode("utf-8").split(b",")[0].strip()
    agent = request.headers.get("User-Agent")
    base = f"{address}|{agent.encode('utf-8') if agent is not None else None}"
    return sha512(base.encode("utf8")).hexdigest()
