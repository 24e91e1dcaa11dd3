"""The Quart application: `create_app(settings)` wires the broker, the model and the routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from quart import Quart, Response, current_app, request
from quart.sessions import NullSession

from . import descriptors, logs, metrics
from .broker import open_broker
from .chat.service import ChatService
from .llm import open_model
from .settings import Settings

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent
# Installed wheels carry the client inside the package; a source checkout has it beside it.
WEB_DIR = next((p for p in (_PACKAGE / "web", _PACKAGE.parent / "web") if p.is_dir()), _PACKAGE)


def create_app(settings: Settings | None = None) -> Quart:
    """Build the app. Connections (broker, model client) open in `before_serving`."""
    settings = settings or Settings.from_env()
    # The app's own static folder and templates are the user's (STATIC_DIR, TEMPLATES_DIR); the
    # chat page's files are served by its blueprint (`routes.page`).
    app = Quart(
        __name__,
        static_folder=settings.static_dir,
        static_url_path="/static",
        template_folder=settings.templates_dir or "templates",
    )
    app.config["CHATBOT_SETTINGS"] = settings
    app.secret_key = settings.secret_key
    app.session_interface.null_session_class = SecretKeyMissing
    app.config["MAX_CONTENT_LENGTH"] = settings.ws_max_message_bytes
    # Conditional requests (ETag) instead of Quart's 12 h cache, so a deploy reaches browsers now.
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = None

    from .mount import read_body_first
    from .routes import http_api, page

    app.register_blueprint(http_api.blueprint)
    app.register_blueprint(page.blueprint(settings.chat_page_path))
    # ASGI middleware the way Quart documents it, `app.asgi_app = wrap(app.asgi_app)`, which mypy
    # reports as assigning to a method (here and below).
    app.asgi_app = read_body_first(app.asgi_app)  # type: ignore[method-assign]
    if settings.wsgi_app:  # every other HTTP request goes to the legacy app (docs/migrating.md)
        from .mount import mount_wsgi

        mount_wsgi(app, settings)
    app.asgi_app = _with_socket_route(app, app.asgi_app)  # type: ignore[method-assign]

    @app.before_request
    async def correlate_request() -> None:
        logs.bind_request(request.headers.get(logs.REQUEST_ID_HEADER))

    @app.after_request
    async def tell_request_id(response: Response) -> Response:
        request_id = logs.request_id()
        if request_id:
            response.headers.setdefault(logs.REQUEST_ID_HEADER, request_id)
        return response

    @app.before_serving
    async def start() -> None:
        broker = open_broker(settings)
        model = open_model(settings)
        service = ChatService(settings, broker, model)
        await service.start()
        logs.set_instance(service.instance)
        metrics.watch(service)
        app.extensions["chat"] = service
        app.extensions["closing"] = Closing()
        log.info(
            "chatbot instance %s serving: broker=%s model=%s%s",
            service.instance,
            broker.kind,
            model.name,
            " (offline demo)" if model.demo else "",
        )

    @app.while_serving
    async def watch_descriptors() -> AsyncGenerator[None, None]:
        watcher = asyncio.ensure_future(descriptors.watch())
        yield
        watcher.cancel()
        with suppress(asyncio.CancelledError):
            await watcher

    @app.after_serving
    async def stop() -> None:
        service: ChatService = app.extensions.pop("chat")
        metrics.unwatch(service)
        await service.close()
        await service.model.close()
        await service.broker.close()

    return app


class SecretKeyMissing(NullSession):
    """The session without SECRET_KEY: readable (empty), and a write says what to set."""

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the session needs a secret: set SECRET_KEY (16+ random characters)")

    __setitem__ = __delitem__ = clear = pop = popitem = update = setdefault = _fail


def _with_socket_route(app: Quart, asgi_app: Any) -> Any:
    """`app.asgi_app` with `/ws` served by `routes.websocket` at the ASGI level (why: there),
    everything else (HTTP, lifespan) by Quart."""
    from .routes.websocket import PATH, chat_socket

    async def route(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and scope["path"] == PATH:
            extensions = app.extensions
            await chat_socket(scope, receive, send, extensions["chat"], extensions["closing"])
        else:
            await asgi_app(scope, receive, send)

    return route


async def drain(app: Quart) -> None:
    """Graceful restart, before the server stops: refuse new sockets and messages, let streaming
    replies finish (up to SHUTDOWN_GRACE_S), and close every socket with 1012.

    With a shared broker the sockets close at once: their clients resume on another instance and
    see the rest of the reply arrive through it. With the in-process broker there is no other
    instance, so the sockets stay open until their replies have ended. A mounted WSGI_APP's
    requests still running get what is left of the grace too.
    """
    service: ChatService = app.extensions["chat"]
    closing: Closing = app.extensions["closing"]
    if service.broker.shared:
        closing.set()
    deadline = asyncio.get_running_loop().time() + service.settings.shutdown_grace_s
    await service.drain(service.settings.shutdown_grace_s)
    closing.set()
    if (bridge := app.extensions.get("wsgi_bridge")) is not None:
        await bridge.threads.idle(deadline - asyncio.get_running_loop().time())


def chat_service() -> ChatService:
    """The running app's `ChatService`."""
    service: ChatService = current_app.extensions["chat"]
    return service


class Closing:
    """Set when the app is shutting down: sockets close with 1012.

    Each socket waits on a future of its own (`watch`), with no task: a future or an Event
    shared by thousands of sockets costs O(sockets) each time one of them stops waiting.
    """

    def __init__(self) -> None:
        self._set = False
        self._watchers: set[asyncio.Future[None]] = set()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        for watcher in self._watchers:
            if not watcher.done():
                watcher.set_result(None)

    @contextmanager
    def watch(self) -> Iterator[asyncio.Future[None]]:
        watcher: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._set:
            watcher.set_result(None)
        self._watchers.add(watcher)
        try:
            yield watcher
        finally:
            self._watchers.discard(watcher)


def closing() -> Closing:
    """The app's shutdown signal."""
    signal: Closing = current_app.extensions["closing"]
    return signal


def settings() -> Settings:
    value: Settings = current_app.config["CHATBOT_SETTINGS"]
    return value
