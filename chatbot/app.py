"""The Quart application: `create_app(settings)` wires the broker, the model and the routes."""

from __future__ import annotations

import logging
from pathlib import Path

from quart import Quart, current_app

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
    app = Quart(__name__, static_folder=str(WEB_DIR), static_url_path="/static")
    app.config["CHATBOT_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.ws_max_message_bytes

    from .routes import http_api, websocket

    app.register_blueprint(http_api.blueprint)
    app.register_blueprint(websocket.blueprint)

    @app.before_serving
    async def start() -> None:
        broker = open_broker(settings)
        model = open_model(settings)
        service = ChatService(settings, broker, model)
        await service.start()
        app.extensions["chat"] = service
        log.info(
            "chatbot instance %s serving: broker=%s model=%s%s",
            service.instance,
            broker.kind,
            model.name,
            " (offline demo)" if model.demo else "",
        )

    @app.after_serving
    async def stop() -> None:
        service: ChatService = app.extensions.pop("chat")
        await service.close()
        await service.model.close()
        await service.broker.close()

    return app


def chat_service() -> ChatService:
    """The running app's `ChatService`."""
    service: ChatService = current_app.extensions["chat"]
    return service


def settings() -> Settings:
    value: Settings = current_app.config["CHATBOT_SETTINGS"]
    return value
