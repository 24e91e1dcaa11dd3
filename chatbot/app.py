"""The Quart application: `create_app(settings)` wires the runtime (`chatbot.runtime`: the
service, its broker and model, the shutdown signal) and the routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from contextlib import suppress
from typing import Any

from quart import Quart, Response, request
from quart.sessions import NullSession

from . import descriptors, logs, metrics
from .runtime import Runtime, attach
from .settings import Settings

log = logging.getLogger(__name__)


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
    runtime = Runtime(settings)
    attach(app, runtime)
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

        runtime.wsgi_bridge = mount_wsgi(app, settings)
    app.asgi_app = _with_socket_route(runtime, app.asgi_app)  # type: ignore[method-assign]

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
        service = await runtime.start()
        logs.set_instance(service.instance)
        metrics.watch(service)
        log.info(
            "chatbot instance %s serving: broker=%s model=%s%s",
            service.instance,
            service.broker.kind,
            service.model.name,
            " (offline demo)" if service.model.demo else "",
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
        metrics.unwatch(runtime.service)
        await runtime.stop()

    return app


class SecretKeyMissing(NullSession):
    """The session without SECRET_KEY: readable (empty), and a write says what to set."""

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the session needs a secret: set SECRET_KEY (16+ random characters)")

    __setitem__ = __delitem__ = clear = pop = popitem = update = setdefault = _fail


def _with_socket_route(runtime: Runtime, asgi_app: Any) -> Any:
    """`app.asgi_app` with `/ws` served by `routes.websocket` at the ASGI level (why: there),
    everything else (HTTP, lifespan) by Quart."""
    from .routes.websocket import PATH, chat_socket

    async def route(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and scope["path"] == PATH:
            await chat_socket(scope, receive, send, runtime)
        else:
            await asgi_app(scope, receive, send)

    return route
