"""Bring your Flask app along: find an app the way `flask --app` does, and serve a WSGI app
(`WSGI_APP`) behind chatbot's own routes, its views running in a bounded pool of threads.

Chatbot's routes (the chat socket, the page, the API, health and metrics) answer first; every
other HTTP request goes to the legacy app, which sees a plain WSGI request: its own session
cookie, templates, blueprints, extensions and error pages work as under gunicorn. A blocking
legacy view costs one of `WSGI_THREADS` threads, never the event loop that streams the chats;
the request bodies are read on the loop first (into a spooled file, bounded by
`WSGI_MAX_BODY_BYTES`), so a slow upload does not hold a thread either. See docs/migrating.md.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import logging
import os
import queue
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import IO, Any

from quart import Quart
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect
from werkzeug.security import safe_join

from .errors import SettingsError
from .settings import Settings

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

# A request body up to this size stays in memory; a bigger one (an upload) goes to a temp file.
SPOOL_IN_MEMORY_BYTES = 256 * 1024
# Requests that may wait for a free thread, per thread; more get 503 at once instead of queueing
# without end behind slow views.
WAITING_PER_THREAD = 8
# A response of known length up to this size is handed to the loop whole (`WsgiBridge._run_app`).
WHOLE_RESPONSE_BYTES = 1024 * 1024
# A thread hands each piece of a streamed response to the event loop and waits until it is sent:
# a client that stops reading lets the thread go after this long.
SEND_TIMEOUT_S = 60.0
# Names `module` alone is searched for, as Flask's CLI does.
APP_NAMES = ("app", "application")
FACTORY_NAMES = ("create_app", "make_app")


class AppNotFound(SettingsError):
    """`module:app` named nothing that could be served."""


def load_app(spec: str, variable: str = "WSGI_APP") -> Any:
    """The app `spec` names: `module:name`, `module:factory()` (literal arguments allowed), or
    `module` alone (its `app`, `application`, `create_app()` or `make_app()`).

    As Flask's CLI does, the working directory comes first on `sys.path`, so the same line works
    from a Procfile on Heroku and in development.
    """
    module_name, _, expression = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name):  # the module itself, not its imports
            raise AppNotFound(variable, f"no module {module_name!r} in {cwd}") from None
        raise
    if expression:
        return _evaluate(module, expression, variable)
    for name in APP_NAMES:
        if callable(getattr(module, name, None)):
            return getattr(module, name)
    for name in FACTORY_NAMES:
        if callable(getattr(module, name, None)):
            return getattr(module, name)()
    raise AppNotFound(variable, f"{module_name!r} has no app: name it, as {module_name}:app")


def _evaluate(module: Any, expression: str, variable: str) -> Any:
    try:
        node = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError:
        raise AppNotFound(variable, f"cannot parse {expression!r}") from None
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    call = isinstance(node, ast.Call)
    if isinstance(node, ast.Call):
        try:
            args = [ast.literal_eval(arg) for arg in node.args]
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except ValueError:
            raise AppNotFound(variable, "a factory's arguments must be literals") from None
        node = node.func
    if not isinstance(node, ast.Name):
        raise AppNotFound(variable, f"{expression!r} is not a name or a call of one")
    found = getattr(module, node.id, None)
    if found is None:
        raise AppNotFound(variable, f"{module.__name__!r} has no {node.id!r}")
    return found(*args, **kwargs) if call else found


def mount_wsgi(app: Quart, settings: Settings) -> WsgiBridge:
    """Serve `settings.wsgi_app` for every HTTP request that `app`'s own routes do not answer;
    the bridge that serves it (its threads are waited for at shutdown)."""
    assert settings.wsgi_app
    legacy = load_app(settings.wsgi_app)
    bridge = WsgiBridge(legacy, settings.wsgi_threads, settings.wsgi_max_body_bytes)
    inner: Callable[..., Any] = app.asgi_app

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not owns(app, scope["path"], scope["method"]):
            await bridge(scope, receive, send)
        else:
            await inner(scope, receive, send)

    app.asgi_app = route  # type: ignore[method-assign,assignment]

    @app.before_serving
    async def tell_shadowed() -> None:  # once every blueprint is registered
        log.info("serving %s for every route chatbot does not own", settings.wsgi_app)
        for method, path, reason in shadowed(app, legacy):
            log.warning("the legacy app's %s %s is answered by chatbot: %s", method, path, reason)

    return bridge


def owns(app: Quart, path: str, method: str) -> bool:
    """Whether one of `app`'s routes answers `method path` (a redirect to a trailing slash
    included). The chat page's static route only owns the files it has."""
    adapter = app.url_map.bind("chatbot")
    try:
        endpoint, args = adapter.match(path, method)
    except RequestRedirect:
        return True
    except HTTPException:  # 404, or 405: the path is someone else's for this method
        return False
    if (endpoint == "static" or endpoint.endswith(".static")) and "filename" in args:
        blueprint = app.blueprints.get(endpoint.rpartition(".")[0])
        folder = (blueprint or app).static_folder
        found = safe_join(str(folder), args["filename"]) if folder else None
        return bool(found and os.path.isfile(found))
    return True


def shadowed(app: Quart, legacy: Any) -> list[tuple[str, str, str]]:
    """The legacy Flask app's fixed routes and static files that chatbot answers instead."""
    url_map = getattr(legacy, "url_map", None)
    if url_map is None:  # not a Flask app: nothing to list
        return []
    found = []
    for rule in url_map.iter_rules():
        if rule.arguments:
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            if owns(app, rule.rule, method):
                found.append((method, rule.rule, "set CHAT_PAGE_PATH to move chatbot's page"))
    folder, prefix = getattr(legacy, "static_folder", None), getattr(legacy, "static_url_path", "")
    if folder and prefix and os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if owns(app, f"{prefix}/{name}", "GET"):
                found.append(("GET", f"{prefix}/{name}", "a file of chatbot's page has that URL"))
    return found


class ClientLeft(Exception):
    """The client went away while its request's body was still arriving."""


class TooManyWaiting(Exception):
    """Every thread is busy and WAITING_PER_THREAD x threads requests already wait."""


class Threads:
    """A fixed set of daemon threads running blocking calls for the event loop.

    Not a `ThreadPoolExecutor`: its threads are joined at interpreter exit, so one stuck legacy
    view would hold a restarting dyno until SIGKILL. A place is taken before a call is queued
    and given back only when the thread is done with it (not when the waiting request is
    cancelled), so at most `size` calls ever run or sit in the queue.
    """

    def __init__(self, size: int, name: str = "wsgi") -> None:
        self.size = size
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._free: asyncio.Semaphore | None = None
        self.waiting = 0
        self.busy = 0
        self._idle: asyncio.Future[None] | None = None

    async def run(self, call: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._free is None:
            self._free = asyncio.Semaphore(self.size)
        if self._free.locked() and self.waiting >= self.size * WAITING_PER_THREAD:
            raise TooManyWaiting
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.busy += 1
        if len(self._threads) < self.size:
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, future, call, args))
        return await future

    async def idle(self, timeout_s: float) -> bool:
        """Wait, at most `timeout_s`, until no call runs or waits; whether that happened."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self.busy:
            log.info("waiting for %d legacy request(s) to finish", self.busy + self.waiting)
        while self.busy and loop.time() < deadline:
            self._idle = loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._idle
        return not self.busy

    def _work(self) -> None:
        while True:
            loop, future, call, args = self._jobs.get()
            try:
                outcome: tuple[Any, BaseException | None] = (call(*args), None)
            except BaseException as exc:
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(self._done, future, *outcome)

    def _done(self, future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        self.busy -= 1
        assert self._free is not None
        self._free.release()
        if not self.busy and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        if future.done():  # the request was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class WsgiBridge:
    """An ASGI app serving a WSGI app: the body is read on the loop, the app runs in `Threads`,
    and each piece of its response is sent from that thread through the loop."""

    def __init__(self, wsgi_app: Callable[..., Any], threads: int, max_body_bytes: int) -> None:
        self.app = wsgi_app
        self.threads = Threads(threads)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _plain(send, 413, "request body too large\n")
        try:
            body = await self._read_body(receive)
        except ClientLeft:  # before its body was whole: the app never sees a truncated request
            log.info(
                "%s %s: the client left before its body arrived", scope["method"], scope["path"]
            )
            return None
        if body is None:
            return await _plain(send, 413, "request body too large\n")
        with body:
            environ = build_environ(scope, body)
            loop = asyncio.get_running_loop()
            try:
                unsent = await self.threads.run(self._run_app, environ, loop, send)
            except TooManyWaiting:
                log.warning("refused %s %s: threads all busy", scope["method"], scope["path"])
                return await _plain(send, 503, "busy, try again\n", [(b"retry-after", b"1")])
        for message in unsent:
            await send(message)

    async def _read_body(self, receive: Receive) -> IO[bytes] | None:
        body = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                body.close()
                raise ClientLeft
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                body.close()
                return None
            body.write(chunk)
            if not message.get("more_body"):
                break
        body.seek(0)
        return body

    def _run_app(self, environ: dict[str, Any], loop: Any, send: Send) -> list[dict[str, Any]]:
        """In a thread: call the WSGI app. A response that says its length, up to
        WHOLE_RESPONSE_BYTES (a page, some JSON), comes back whole for the loop to send: one
        hand-over between the thread and the loop instead of one per piece, each costing a
        wait for the GIL on both sides. Any other is sent from here as the app yields it, so a
        streamed response streams. What is left for the loop to send is returned."""
        pending: list[dict[str, Any]] = []
        streaming = False
        started: list[dict[str, Any]] = []  # the response start, until the first piece
        sent = False

        def emit(message: dict[str, Any]) -> None:
            if streaming:
                asyncio.run_coroutine_threadsafe(send(message), loop).result(SEND_TIMEOUT_S)
            else:
                pending.append(message)

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            if exc_info and sent and streaming:
                raise exc_info[1].with_traceback(exc_info[2])
            raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            code = int(status.split(" ", 1)[0])
            started[:] = [{"type": "http.response.start", "status": code, "headers": raw}]
            return write

        def write(data: bytes) -> None:
            nonlocal sent, streaming
            if not sent:
                if not started:
                    raise RuntimeError("the WSGI app wrote before start_response")
                length = dict(started[0]["headers"]).get(b"content-length", b"")
                streaming = not (length.isdigit() and int(length) <= WHOLE_RESPONSE_BYTES)
                emit(started[0])
                sent = True
            if data:
                emit({"type": "http.response.body", "body": data, "more_body": True})

        try:
            result: Iterable[bytes] = self.app(environ, start_response)
            try:
                for piece in result:
                    write(piece)
                write(b"")
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:
            if streaming:
                raise  # mid-response: the server drops the connection
            log.exception("legacy %s %s failed", environ["REQUEST_METHOD"], environ["PATH_INFO"])
            body = b"internal server error\n"
            return [_start(500, len(body)), {"type": "http.response.body", "body": body}]
        emit({"type": "http.response.body", "body": b"", "more_body": False})
        return pending


def build_environ(scope: Scope, body: IO[bytes]) -> dict[str, Any]:
    """The WSGI environ of an ASGI HTTP scope (PEP 3333: strings are latin-1 decoded bytes)."""
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode().decode("latin-1"),
        "PATH_INFO": scope["path"].encode().decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": client[0] if client else "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.input_terminated": True,  # the whole body is there (also when it came chunked)
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        if name not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = "HTTP_" + name
        value = raw_value.decode("latin-1")
        if name in environ:  # repeated: joined as RFC 9110 says (cookies with "; ", RFC 6265)
            value = environ[name] + ("; " if name == "HTTP_COOKIE" else ",") + value
        environ[name] = value
    body.seek(0, os.SEEK_END)
    length = body.tell()
    body.seek(0)
    if length or "CONTENT_LENGTH" in environ:
        environ["CONTENT_LENGTH"] = str(length)
    return environ


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _start(status: int, length: int, extra: Iterable[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % length)]
    return {"type": "http.response.start", "status": status, "headers": headers + list(extra)}


async def _plain(
    send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = text.encode()
    await send(_start(status, len(body), extra or ()))
    await send({"type": "http.response.body", "body": body, "more_body": False})


# How long the end of a response may wait for the rest of its request's body (`read_body_first`).
BODY_DRAIN_TIMEOUT_S = 5.0


def read_body_first(asgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """`asgi_app` with each HTTP response's last piece held until the request's body has
    arrived (at most BODY_DRAIN_TIMEOUT_S).

    Hypercorn closes the connection the moment a response ends while its request's body is still
    coming, and a client still sending then gets a reset instead of the answer: Quart's 413 for a
    body over MAX_CONTENT_LENGTH, which it answers before reading the body, was mostly lost that
    way (Flask under a WSGI server answers it). Quart's own reader goes on reading meanwhile and
    drops what it no longer needs, so the wait costs no memory.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await asgi_app(scope, receive, send)
            return
        arrived = asyncio.get_running_loop().create_future()

        async def receive_tracked() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                if not arrived.done():
                    arrived.set_result(None)
            return message

        async def send_after_body(message: dict[str, Any]) -> None:
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if last and not arrived.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BODY_DRAIN_TIMEOUT_S):
                        await asyncio.shield(arrived)
            await send(message)

        await asgi_app(scope, receive_tracked, send_after_body)

    return app


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return bool(value != b"0")
        if name == b"transfer-encoding":
            return True
    return False
