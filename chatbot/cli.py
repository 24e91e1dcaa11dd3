"""`chatbot serve [--host H] [--port P]`: serve the app with Hypercorn on uvloop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from hypercorn.config import Config

from .errors import SettingsError
from .settings import Settings

log = logging.getLogger("chatbot")

# Hypercorn's default backlog of 100 drops handshakes when many clients connect at once.
LISTEN_BACKLOG = 2048


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatbot", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="serve the chat app (the default command)")
    for sub in (parser, serve):
        sub.add_argument("--host", help="interface to bind (default: $HOST or 0.0.0.0)")
        sub.add_argument("--port", type=int, help="port to bind (default: $PORT or 8000)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"chatbot: bad configuration: {exc}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.replace(**overrides)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run(_serve(settings))
    return 0


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.backlog = LISTEN_BACKLOG
    config.websocket_ping_interval = settings.ws_ping_interval_s
    config.websocket_max_message_size = settings.ws_max_message_bytes
    config.graceful_timeout = 5.0
    config.accesslog = None
    return config


async def _serve(settings: Settings) -> None:
    from hypercorn.asyncio import serve

    from .app import create_app

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("listening on http://%s:%d", settings.host, settings.port)
    await serve(create_app(settings), hypercorn_config(settings), shutdown_trigger=stopping.wait)


def run(main: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(main)  # type: ignore[arg-type]
    else:
        uvloop.run(main)  # type: ignore[arg-type]
