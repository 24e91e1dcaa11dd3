"""What a running app is made of, in one typed object: the settings, the `ChatService`, the
shutdown signal and the mounted legacy app's bridge.

`create_app` (the composition root, `chatbot/app.py`) builds one `Runtime` per app and keeps it
on the app; the routes reach it with `runtime()` (the current app's) and never import the app
module. `runtime_of(app)` is the same from outside a request (the server, tests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quart import Quart, current_app

from .chat.service import ChatService
from .settings import Settings

if TYPE_CHECKING:
    from .mount import WsgiBridge

log = logging.getLogger(__name__)

# The one key of `app.extensions` chatbot uses.
EXTENSION = "chatbot"


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


@dataclass(eq=False, slots=True)
class Runtime:
    """One app's parts. The service exists while the app serves (`start` to `stop`)."""

    settings: Settings
    # The legacy app served for the routes chatbot does not own (WSGI_APP), if any.
    wsgi_bridge: WsgiBridge | None = None
    closing: Closing = field(default_factory=Closing)
    _service: ChatService | None = field(default=None, init=False, repr=False)

    @property
    def service(self) -> ChatService:
        if self._service is None:
            raise RuntimeError(
                "the chat service runs only while the app serves "
                "(in tests: `async with app.test_app()`)"
            )
        return self._service

    async def start(self) -> ChatService:
        """Open and start the service (with its broker and model)."""
        self.closing = Closing()
        self._service = await ChatService.open(self.settings)
        return self._service

    async def stop(self) -> None:
        """Close the service, and with it its broker and model."""
        service, self._service = self.service, None
        await service.close()

    async def drain(self) -> None:
        """Graceful restart, before the server stops: refuse new sockets and messages, let
        streaming replies finish (up to SHUTDOWN_GRACE_S), and close every socket with 1012.

        With a shared broker the sockets close at once: their clients resume on another instance
        and see the rest of the reply arrive through it. With the in-process broker there is no
        other instance, so the sockets stay open until their replies have ended. A mounted
        WSGI_APP's requests still running get what is left of the grace too.
        """
        service = self.service
        grace_s = self.settings.shutdown_grace_s
        if service.broker.shared:
            self.closing.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        await service.drain(grace_s)
        self.closing.set()
        if self.wsgi_bridge is not None:
            await self.wsgi_bridge.threads.idle(deadline - loop.time())


def attach(app: Quart, runtime: Runtime) -> None:
    """Keep `runtime` on `app`, once."""
    if EXTENSION in app.extensions:
        raise RuntimeError(f"{app.name} already has a chatbot runtime")
    app.extensions[EXTENSION] = runtime


def runtime_of(app: Quart) -> Runtime:
    """`app`'s runtime; `LookupError` for an app `chatbot.create_app()` did not build."""
    found = app.extensions.get(EXTENSION)
    if not isinstance(found, Runtime):
        raise LookupError(f"{app.name!r} is not an app from chatbot.create_app()")
    return found


def runtime() -> Runtime:
    """The current app's runtime (in a request, or with an app context)."""
    return runtime_of(current_app)
