"""`chatbot serve [module:app] [--host H] [--port P] [--workers N]`: serve the app with
Hypercorn on uvloop.

`module:app` names your own app built from `chatbot.create_app()` (docs/migrating.md); without
it, chatbot's own."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from contextlib import suppress
from typing import Any

from hypercorn.config import Config
from quart import Quart

from . import broker, collector, logs, metrics, patches
from .errors import SettingsError
from .patches import hypercorn as hypercorn_fixes
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
        sub.add_argument(
            "--workers",
            type=int,
            help="processes sharing the port, each a full instance; more than 1 needs REDIS_URL "
            "(default: $WEB_CONCURRENCY or 1)",
        )
        sub.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker
    serve.add_argument(
        "app", nargs="?", help="module:app or module:create_app(), built from chatbot.create_app()"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"chatbot: bad configuration: {exc}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.replace(**overrides)
    logs.configure(settings)
    workers = settings.web_concurrency if args.workers is None else args.workers
    if workers > 1 and not broker.backend(settings.redis_url).shared:
        if args.workers is not None:
            print(
                f"chatbot: --workers {workers} needs REDIS_URL: with the in-process broker each "
                "worker would keep its own sessions, and a client reconnecting to another worker "
                "would lose them. Set REDIS_URL, or serve with one worker.",
                file=sys.stderr,
            )
            return 2
        # Heroku's Python buildpack sets WEB_CONCURRENCY on every dyno by itself (2 on the
        # smallest): refusing it would stop every app without Redis at boot.
        log.warning(
            "WEB_CONCURRENCY=%d ignored: more than one worker needs REDIS_URL; serving with one",
            workers,
        )
        workers = 1
    if workers > 1:
        from .workers import supervise

        return supervise(workers, argv)
    try:
        app = _app(getattr(args, "app", None), settings)
    except SettingsError as exc:
        print(f"chatbot: bad configuration: {exc}", file=sys.stderr)
        return 2
    run(_serve(settings, app, reuse_port=args.reuse_port))
    return 0


def _app(spec: str | None, settings: Settings) -> Quart:
    """chatbot's app, or the user's `module:app` (which must come from `create_app()`: the
    drain and the chat socket are part of it)."""
    from .app import create_app

    if spec is None:
        return create_app(settings)
    from .mount import load_app
    from .runtime import runtime_of

    app = load_app(spec, variable="chatbot serve APP")
    if isinstance(app, Quart):
        with suppress(LookupError):
            runtime_of(app)
            return app
    raise SettingsError("chatbot serve APP", f"{spec} is not an app from chatbot.create_app()")


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.backlog = LISTEN_BACKLOG
    config.websocket_ping_interval = settings.ws_ping_interval_s
    config.websocket_max_message_size = settings.ws_max_message_bytes
    # Sockets are closed by `Runtime.drain` before Hypercorn's own shutdown starts; what is left
    # are its websocket ping loops, which sleep up to a ping interval after their socket closed.
    config.graceful_timeout = 1.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # through our handler and format
    # The frame limit, deflate and ping fixes live where Hypercorn reads the bytes.
    patches.verify()  # every patch, before the app's broker applies its own
    hypercorn_fixes.install(
        settings.ws_max_message_bytes,
        deflate=settings.ws_permessage_deflate,
        close_linger_s=settings.ws_close_linger_s,
    )
    return config


async def _serve(settings: Settings, app: Quart, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then restart gracefully.

    Hypercorn alone would leave websockets open until its graceful timeout and then drop them
    (clients see 1006); `Runtime.drain` first lets replies finish and closes every socket with
    1012.
    """
    from hypercorn.asyncio import serve

    from .runtime import runtime_of

    # After the app's own start-up hook: the broker and model clients it opens import most of
    # the process's modules (753 of them), and those belong to what is never scanned too.
    app.before_serving(tune_gc)
    app.while_serving(collector.run_collections)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def shutdown_trigger() -> None:
        await stopping.wait()
        log.info("shutting down: draining sockets and replies")
        await runtime_of(app).drain()
        loop.set_exception_handler(_quiet_cancelled_connections)

    config = hypercorn_config(settings)
    if reuse_port:  # a worker of `--workers N` (chatbot/workers.py)
        from .workers import reuse_port_socket

        listener = reuse_port_socket(settings.host, settings.port)
        config.bind = [f"fd://{listener.detach()}"]  # Hypercorn's to close now
    log.info("listening on http://%s:%d", settings.host, settings.port)
    await serve(app, config, shutdown_trigger=shutdown_trigger)
    log.info("stopped")


async def tune_gc() -> None:
    """The collector's policy for serving (chatbot/collector.py), its pauses timed."""
    collector.install()
    metrics.time_gc()


def _quiet_cancelled_connections(
    loop: asyncio.AbstractEventLoop, context: dict[str, object]
) -> None:
    """At shutdown Hypercorn cancels the connection tasks still open (its websocket ping loops
    outlive their sockets by up to a ping interval). Python 3.11's `start_server` callback then
    calls `task.exception()` on the cancelled task and reports the CancelledError as an error;
    drop just that."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        log.debug("connection task cancelled at shutdown")
        return
    loop.default_exception_handler(context)


def run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(main)
    else:
        uvloop.run(main)
