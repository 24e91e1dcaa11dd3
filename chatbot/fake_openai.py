"""A fake OpenAI-compatible chat-completions server for tests, local development and benchmarks.

It speaks the real wire format (JSON and server-sent events) over real HTTP/1.1, so the `openai`
client is exercised end to end: it uses `httpx2`, which no httpx mock intercepts. Replies are
deterministic (`reply_chunks`), timing is configurable, and failures are injected per request by
directives such as ``[[fake:status=429]]`` in the last user message. Every chat request is recorded
and can be awaited, so tests wait on events instead of sleeping.

It runs on bare asyncio streams and `h11` rather than a web framework because benchmarks hold
~1,000 concurrent streams on two cores: a stream costs one sleeping task and a few small writes.

Run it with ``python -m chatbot.fake_openai --port 8001`` and point the app at
``OPENAI_BASE_URL=http://127.0.0.1:8001/v1``. With ``--tls`` it serves https with a throwaway
self-signed certificate and prints the file to trust (``SSL_CERT_FILE=...``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

__all__ = [
    "Behaviour",
    "DirectiveError",
    "FakeOpenAI",
    "parse_prompt",
    "reply_chunks",
    "reply_text",
    "self_signed_certificate",
    "split_surrogates",
]

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT_S = 300.0  # longer than any client pool's idle expiry, so we never race a reuse
WRITE_TIMEOUT_S = 30.0
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_LONG_POLL_S = 300.0
_WRITE_HIGH_WATER = 64 * 1024
Headers = Sequence[tuple[str, str]]
_DIRECTIVE = re.compile(r"\[\[fake:([A-Za-z_]+)(?:=([^\]\s]*))?\]\]")


def reply_chunks(prompt: str, chunks: int, pad: int = 0, split: int = 0) -> list[str]:
    """The content pieces streamed for `prompt` (the last user message, directives removed).

    `pad` (the `pad` directive) adds that many dots to every word, for large replies. `split`
    streams the echo in pieces of that many characters, as a model writes a long formatted
    answer (the web page's Markdown rendering is measured with it).
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    dots = "." * pad
    echo = f"You said: {prompt}\n"
    pieces = [echo[i : i + split] for i in range(0, len(echo), split)] if split else [echo]
    return [*pieces, *(f"word{k}{dots} " for k in range(1, chunks))]


def split_surrogates(pieces: list[str]) -> list[str]:
    """`pieces` as a server that cuts text by UTF-16 code units sends them (the `surrogates`
    directive): an emoji's surrogate pair split between the first two pieces, and half of a pair
    with no partner at the very end. Neither half alone is Unicode text."""
    split = list(pieces)
    split[0] += "\ud83d"  # U+1F600, its second half opens the next piece
    if len(split) > 1:
        split[1] = "\ude00" + split[1]
    split[-1] += "\ud83d"
    return split


def reply_text(prompt: str, chunks: int, pad: int = 0, split: int = 0) -> str:
    """The whole reply for `prompt`: what a client assembles from the stream."""
    return "".join(reply_chunks(prompt, chunks, pad, split))


class DirectiveError(ValueError):
    """A ``[[fake:...]]`` directive or a ``/_fake/config`` key is unknown or has a bad value."""


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """How one request is answered: the server defaults overridden by the request's directives."""

    ttft_ms: int = 300
    chunks: int = 20
    interval_ms: int = 100
    status: int | None = None  # answer with this HTTP error instead of a completion
    retry_after: str | None = None  # Retry-After header of an error answer
    cut: int | None = None  # drop the TCP connection after this many content chunks
    malformed: int | None = None  # send one invalid JSON event after this many content chunks
    hang: bool = False  # never send response headers
    surrogates: bool = False  # lone UTF-16 surrogates in the text (`split_surrogates`)
    hang_after: int | None = None  # stall forever after this many content chunks
    pad: int = 0  # dots added to every word: large replies without more chunks
    split: int = 0  # stream the echoed prompt in pieces of this many characters (0: in one)
    # Write the chunked body's terminator this long after `[DONE]` instead of with it, as
    # LiteLLM's proxy and llama.cpp's server do: a client that stops reading at `[DONE]` then
    # leaves the body unfinished, and its HTTP client cannot pool the connection.
    end_apart_ms: int | None = None
    close: bool = False  # answer with `Connection: close`: every request on a new connection

    def merged(self, options: dict[str, Any]) -> Behaviour:
        """A copy with `options` (directive or config values, validated here) applied."""
        return dataclasses.replace(self, **{k: _coerce(k, v) for k, v in options.items()})


_KEYS = frozenset(f.name for f in dataclasses.fields(Behaviour))
_CLEARABLE = frozenset({"status", "retry_after", "cut", "malformed", "hang_after", "end_apart_ms"})


def _coerce(key: str, value: Any) -> Any:
    if key not in _KEYS:
        raise DirectiveError(f"unknown fake option {key!r}; expected one of {sorted(_KEYS)}")
    if key in ("hang", "surrogates", "close"):  # a bare `[[fake:hang]]` arrives as None
        return value is None or value is True or str(value).lower() in ("1", "true")
    if value is None and key in _CLEARABLE:
        return None  # lets /_fake/config clear a failure mode
    if key == "retry_after":
        return str(value)
    try:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError
        number = int(value)
    except ValueError:
        raise DirectiveError(f"fake option {key!r} needs an integer, got {value!r}") from None
    if number < (1 if key == "chunks" else 0) or (key == "status" and not 400 <= number <= 599):
        raise DirectiveError(f"fake option {key!r} is out of range: {number}")
    return number


def parse_prompt(content: str) -> tuple[str, dict[str, str | None]]:
    """Split a user message into the echoed prompt and its ``[[fake:key=value]]`` directives.

    The tokens are removed; if there were any, whitespace at both ends is stripped too, so
    ``"hi [[fake:chunks=3]]"`` echoes ``"hi"``. Without directives the text is echoed verbatim.
    """
    directives = {m[1]: m[2] for m in _DIRECTIVE.finditer(content)}
    if not directives:
        return content, {}
    return _DIRECTIVE.sub("", content).strip(), directives


def _text_of(content: Any) -> str:
    if isinstance(content, list):  # the content-parts form: [{"type": "text", "text": ...}]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    kind = {401: "invalid_request_error", 404: "invalid_request_error", 429: "requests"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Exchange:
    """One request/response on a connection: the parsed request and h11-framed writes."""

    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request):
        self.conn, self.writer = conn, writer
        url = urlsplit(request.target.decode("latin-1"))
        self.method = request.method.decode("ascii")
        self.path = url.path
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers
        }
        self.body = bytearray()

    async def _write(self, *events: h11.Event) -> None:
        self.writer.write(b"".join(self.conn.send(e) or b"" for e in events))
        await self._written()

    async def _written(self) -> None:
        transport = self.writer.transport
        if transport.is_closing():  # writes to a lost connection are silently dropped by asyncio
            raise ConnectionResetError("client went away")
        # Drain (and arm a timer) only when the kernel pushes back: at 1,000 streams a timeout
        # per chunk costs more than the chunk itself.
        if transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await self.writer.drain()

    def _response(self, status: int, headers: Headers) -> h11.Response:
        return h11.Response(
            status_code=status, headers=list(headers), reason=HTTPStatus(status).phrase.encode()
        )

    async def send_json(self, status: int, obj: Any, headers: Headers = ()) -> None:
        await self.send_raw(status, json.dumps(obj).encode(), headers)

    async def send_raw(self, status: int, body: bytes, headers: Headers = ()) -> None:
        head = [("content-type", "application/json"), ("content-length", str(len(body))), *headers]
        await self._write(self._response(status, head), h11.Data(data=body), h11.EndOfMessage())

    async def send_error(
        self, status: int, message: str, code: str | None = None, **kw: Any
    ) -> None:
        await self.send_json(status, _error_body(status, message, code), **kw)

    async def start_stream(self, first: bytes, *, close: bool = False) -> None:
        head = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
        if close:
            head.append(("connection", "close"))
        await self._write(self._response(200, head), h11.Data(data=first))

    async def send_data(self, data: bytes, *, end: bool = False) -> None:
        """A piece of a streamed (chunked) body. The chunk is framed here: h11 keeps no count
        of a chunked body, and its framing cost a fifth of this server's CPU at 1,000 streams."""
        if self.conn.their_http_version != b"1.1":  # an HTTP/1.0 client: no chunked framing
            return await self._write(h11.Data(data=data), *([h11.EndOfMessage()] if end else []))
        chunk = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if end:
            chunk += self.conn.send(h11.EndOfMessage()) or b""
        self.writer.write(chunk)
        await self._written()

    def abort(self) -> None:
        self.writer.transport.abort()


class _Chunks:
    """Pre-encoded SSE framing of one completion, so each content chunk costs one small dumps."""

    def __init__(self, completion_id: str, created: int, model: str):
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created}
        self.base = {**head, "model": model}
        base = json.dumps(self.base)[:-1].encode()  # without its closing brace
        self._prefix = b"data: " + base + b', "choices": [{"index": 0, "delta": {"content": '
        self._suffix = b'}, "finish_reason": null}]}\n\n'

    def content(self, text: str) -> bytes:
        return self._prefix + json.dumps(text).encode() + self._suffix

    def event(self, obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps({**self.base, **obj}).encode() + b"\n\n"

    def delta(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return self.event({"choices": [choice]})


@dataclasses.dataclass
class _Reply:
    """What one chat request will be answered with."""

    record: dict[str, Any]
    opts: Behaviour
    pieces: list[str]
    finish: str
    usage: dict[str, int]
    include_usage: bool
    chunks: _Chunks


class FakeOpenAI:
    """A fake OpenAI chat-completions server; an async context manager that starts and closes it.

    `requests` holds one live record per chat request: ``{"id", "model", "messages", "stream",
    "status", "chunks_sent", "text_sent", "authorization"}`` where status is ``"streaming"`` (in
    progress), ``"completed"``, ``"aborted"`` (the client left first), ``"failed"`` (a ``cut``) or
    ``"error_response"`` (an HTTP error was answered).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ttft_ms: int = 300,
        chunks: int = 20,
        interval_ms: int = 100,
        api_key: str | None = None,
        tls: ssl.SSLContext | None = None,
    ):
        self.host, self.port, self.api_key = host, port, api_key
        self.tls = tls  # serve https (see `tls_context`)
        self._startup = Behaviour().merged(
            {"ttft_ms": ttft_ms, "chunks": chunks, "interval_ms": interval_ms}
        )
        self.config = self._startup
        self.requests: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._closing = False
        self._connections: set[asyncio.Task[None]] = set()
        self.connections_accepted = 0  # lets tests see that keep-alive reused a connection
        self._routes: dict[tuple[str, str], Callable[[_Exchange], Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("GET", "/v1/models"): self._models,
            ("GET", "/_fake/requests"): self._list_requests,
            ("GET", "/_fake/stats"): self._stats,
            ("POST", "/_fake/reset"): self._reset,
            ("GET", "/_fake/config"): self._config,
            ("POST", "/_fake/config"): self._config,
        }

    @property
    def base_url(self) -> str:
        """The URL to give the `openai` client, e.g. ``http://127.0.0.1:8001/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/v1"

    async def start(self) -> None:
        """Bind and start serving; `port` is the bound port afterwards (useful with port 0)."""
        # One socket (not start_server's one per resolved address, which would get different
        # ports with port 0), and a deep backlog so a burst of 1,000 connects is not dropped.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=4096)
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(
            self._serve_connection, sock=sock, backlog=4096, ssl=self.tls
        )

    async def close(self) -> None:
        """Stop listening and abort every open connection (open streams become "aborted")."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(*self._connections, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def configure(self, **options: Any) -> Behaviour:
        """Change the defaults (directive keys); ``reset=True`` starts from the start-up ones."""
        base = self._startup if options.pop("reset", False) else self.config
        self.config = base.merged(options)
        return self.config

    def reset(self) -> None:
        """Forget all records (ids restart at 1) and restore the start-up defaults."""
        self.requests = []
        self.config = self._startup
        self._notify()

    async def wait_request(
        self, n: int, *, ended: bool = False, timeout_s: float = 5.0
    ) -> dict[str, Any]:
        """Wait until request `n` (1-based) exists, or with `ended` until it is no longer streaming.

        Returns the live record; raises `TimeoutError` after `timeout_s`.
        """
        async with asyncio.timeout(timeout_s):
            while True:
                record = self.requests[n - 1] if 0 < n <= len(self.requests) else None
                if record is not None and not (ended and record["status"] == "streaming"):
                    return record
                await self._changed.wait()

    def _notify(self) -> None:
        # A fresh Event per change: a broadcast to every waiter without a lock per record update.
        self._changed.set()
        self._changed = asyncio.Event()

    # -- connection handling ------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.connections_accepted += 1
        conn = h11.Connection(h11.SERVER)
        clean = False
        try:
            while (exchange := await self._read_request(conn, reader, writer)) is not None:
                if not await self._respond_watching_eof(exchange, reader):
                    break
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break  # Connection: close, or a response that did not finish
                conn.start_next_cycle()
            clean = True
        except h11.RemoteProtocolError as e:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # h11 still lets us answer
                status = e.error_status_hint
                body = json.dumps(_error_body(status, str(e))).encode()
                head = [("content-type", "application/json"), ("content-length", str(len(body)))]
                reason = HTTPStatus(status).phrase.encode()
                response = h11.Response(status_code=status, headers=head, reason=reason)
                writer.write(conn.send(response) + conn.send(h11.Data(data=body)))
                clean = True
        except (ConnectionError, TimeoutError):
            pass  # idle timeout or reset: nobody to answer
        except asyncio.CancelledError:
            # close() cancels us. Ending cancelled makes Python < 3.12 log a bogus traceback from
            # start_server's done-callback (https://github.com/python/cpython/issues/113538).
            if not self._closing:
                raise
        finally:
            self._connections.discard(task)
            if clean:
                writer.close()
            else:
                writer.transport.abort()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Exchange | None:
        exchange: _Exchange | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(KEEPALIVE_TIMEOUT_S):
                    conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                exchange = _Exchange(conn, writer, event)
            elif isinstance(event, h11.Data) and exchange is not None:
                exchange.body += event.data
                if len(exchange.body) > MAX_BODY_BYTES:
                    await exchange.send_error(413, "request body too large")
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return exchange
            else:  # ConnectionClosed (or PAUSED, impossible here): the client is done
                return None

    async def _respond_watching_eof(
        self, exchange: _Exchange, reader: asyncio.StreamReader
    ) -> bool:
        """Answer `exchange` while reading the socket, so a client that leaves mid-stream is
        noticed at once (not at our next write). Returns False if the client went away."""

        async def watch() -> None:
            while data := await reader.read(65536):
                exchange.conn.receive_data(data)  # pipelined bytes wait in h11 for the next cycle

        handler = asyncio.create_task(self._route(exchange))
        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait((handler, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            handler.cancel()
            watcher.cancel()
            await asyncio.gather(handler, watcher, return_exceptions=True)
        if not handler.cancelled():
            handler.result()  # re-raise a connection error from the handler
            return True
        return False

    async def _route(self, ex: _Exchange) -> None:
        try:
            if handler := self._routes.get((ex.method, ex.path)):
                await handler(ex)
            elif ex.method == "GET" and ex.path.startswith("/_fake/requests/"):
                await self._get_request(ex)
            else:
                await ex.send_error(404, f"Invalid URL ({ex.method} {ex.path})", "unknown_url")
        except (asyncio.CancelledError, ConnectionError, TimeoutError):
            raise
        except Exception:
            log.exception("fake-openai: %s %s crashed", ex.method, ex.path)
            if ex.conn.our_state is h11.SEND_RESPONSE:
                await ex.send_error(500, "fake-openai crashed; see its log")
            else:
                ex.abort()

    # -- chat completions ---------------------------------------------------------------------

    async def _chat(self, ex: _Exchange) -> None:
        auth = ex.headers.get("authorization")
        record: dict[str, Any] = {
            "id": len(self.requests) + 1, "model": None, "messages": None, "stream": False,
            "status": "streaming", "chunks_sent": 0, "text_sent": "",
            "authorization": auth is not None,
        }  # fmt: skip
        self.requests.append(record)
        self._notify()
        try:
            await self._chat_reply(ex, record, auth)
        except (asyncio.CancelledError, ConnectionError, TimeoutError):
            record["status"] = "aborted"
            raise
        except BaseException:
            record["status"] = "failed"
            raise
        finally:
            self._notify()

    async def _chat_reply(self, ex: _Exchange, record: dict[str, Any], auth: str | None) -> None:
        async def refuse(status: int, message: str, code: str | None = None, **kw: Any) -> None:
            record["status"] = "error_response"
            await ex.send_error(status, message, code, **kw)

        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            return await refuse(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            body = json.loads(ex.body)
            record["model"], record["messages"] = body["model"], body["messages"]
            record["stream"] = bool(body.get("stream", False))
            users = [m for m in body["messages"] if m.get("role") == "user"]
            prompt, directives = parse_prompt(_text_of(users[-1].get("content")) if users else "")
            opts = self.config.merged(directives)
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            words = sum(len(_text_of(m.get("content")).split()) for m in body["messages"])
        except DirectiveError as e:
            return await refuse(400, str(e))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return await refuse(400, f"invalid request body: {e!r}", "invalid_request")

        if opts.status is not None:
            headers = [("retry-after", opts.retry_after)] if opts.retry_after is not None else []
            message = f"fake-openai: status={opts.status} requested"
            code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(opts.status)
            return await refuse(opts.status, message, code, headers=headers)
        if opts.hang:
            await asyncio.Future()  # until the client leaves or we close; the watcher cancels us

        pieces = reply_chunks(prompt, opts.chunks, opts.pad, opts.split)
        if opts.surrogates:
            pieces = split_surrogates(pieces)
        finish = "stop"
        if isinstance(max_tokens, int) and max_tokens < len(pieces):
            pieces, finish = pieces[: max(max_tokens, 0)], "length"
        usage = {"prompt_tokens": words, "completion_tokens": len(pieces)}
        usage["total_tokens"] = words + len(pieces)
        reply = _Reply(
            record, opts, pieces, finish, usage, include_usage,
            _Chunks(f"chatcmpl-fake{record['id']}", int(time.time()), record["model"]),
        )  # fmt: skip
        await (self._stream if record["stream"] else self._complete)(ex, reply)

    async def _stream(self, ex: _Exchange, r: _Reply) -> None:
        def at(option: int | None) -> int | None:  # an N past the end acts before the final chunk
            return None if option is None else min(option, len(r.pieces))

        cut, malformed, hang_after = at(r.opts.cut), at(r.opts.malformed), at(r.opts.hang_after)
        first = r.chunks.delta({"role": "assistant", "content": ""}, None)
        await ex.start_stream(first, close=r.opts.close)
        for k in range(len(r.pieces) + 1):
            if k == malformed:
                await ex.send_data(b"data: {not json\n\n")
            if k == cut:
                r.record["status"] = "failed"
                return ex.abort()
            if k == hang_after:
                await asyncio.Future()  # stall with the stream open until the client leaves
            if k == len(r.pieces):
                break
            await asyncio.sleep((r.opts.ttft_ms if k == 0 else r.opts.interval_ms) / 1000)
            await ex.send_data(r.chunks.content(r.pieces[k]))
            r.record["chunks_sent"] += 1
            r.record["text_sent"] += r.pieces[k]
        tail = r.chunks.delta({}, r.finish)
        if r.include_usage:
            tail += r.chunks.event({"choices": [], "usage": r.usage})
        tail += b"data: [DONE]\n\n"
        if r.opts.end_apart_ms is None:  # one write: the body's terminator follows [DONE] at once
            await ex.send_data(tail, end=True)
        else:
            await ex.send_data(tail)
            await asyncio.sleep(r.opts.end_apart_ms / 1000)
            await ex.send_data(b"", end=True)
        r.record["status"] = "completed"

    async def _complete(self, ex: _Exchange, r: _Reply) -> None:
        if r.opts.hang_after is not None:
            await asyncio.Future()
        delay_ms = r.opts.ttft_ms + r.opts.interval_ms * max(len(r.pieces) - 1, 0)
        await asyncio.sleep(delay_ms / 1000)
        if r.opts.cut is not None:
            r.record["status"] = "failed"
            return ex.abort()
        if r.opts.malformed is not None:
            await ex.send_raw(200, b"{not json")
        else:
            text = "".join(r.pieces)
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": r.finish}
            body = {**r.chunks.base, "object": "chat.completion", "choices": [choice]}
            await ex.send_json(200, {**body, "usage": r.usage})
            r.record["chunks_sent"], r.record["text_sent"] = len(r.pieces), text
        r.record["status"] = "completed"

    # -- control endpoints --------------------------------------------------------------------

    async def _models(self, ex: _Exchange) -> None:
        models = [{"id": m, "object": "model", "created": 0, "owned_by": "fake-openai"}
                  for m in ("gpt-4o-mini", "gpt-4o")]  # fmt: skip
        await ex.send_json(200, {"object": "list", "data": models})

    async def _list_requests(self, ex: _Exchange) -> None:
        await ex.send_json(200, self.requests)

    async def _stats(self, ex: _Exchange) -> None:
        stats = {"connections_accepted": self.connections_accepted, "requests": len(self.requests)}
        await ex.send_json(200, stats)

    async def _get_request(self, ex: _Exchange) -> None:
        try:
            n = int(ex.path.rsplit("/", 1)[1])
            wait = ex.query.get("wait")
            timeout_s = min(float(ex.query.get("timeout_s", 5.0)), MAX_LONG_POLL_S)
        except ValueError as e:
            return await ex.send_error(400, f"bad request number or timeout_s: {e}")
        if wait not in (None, "exists", "ended"):
            return await ex.send_error(400, f"wait must be 'exists' or 'ended', got {wait!r}")
        if wait is None:
            if not 0 < n <= len(self.requests):
                return await ex.send_error(404, f"no request {n}")
            return await ex.send_json(200, self.requests[n - 1])
        try:
            record = await self.wait_request(n, ended=wait == "ended", timeout_s=timeout_s)
        except TimeoutError:
            what = "start" if wait == "exists" else "end"
            return await ex.send_error(408, f"request {n} did not {what} within {timeout_s} s")
        await ex.send_json(200, record)

    async def _reset(self, ex: _Exchange) -> None:
        self.reset()
        await ex.send_json(200, {"ok": True})

    async def _config(self, ex: _Exchange) -> None:
        if ex.method == "POST":
            try:
                options = json.loads(ex.body or b"{}")
                if not isinstance(options, dict):
                    raise DirectiveError("expected a JSON object")
                self.configure(**options)
            except (ValueError, TypeError) as e:  # DirectiveError and JSONDecodeError included
                return await ex.send_error(400, str(e))
        await ex.send_json(200, dataclasses.asdict(self.config))


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for localhost and 127.0.0.1 and its key, made with the `openssl`
    command in `directory`: (cert.pem, key.pem). A client trusts it through its CA file
    (``SSL_CERT_FILE=cert.pem`` for the chatbot)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server side of https with `cert` and `key`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def _serve(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="fake-openai-tls-") as scratch:
        cert, key = args.tls_cert, args.tls_key
        if args.tls and cert is None:
            cert, key = self_signed_certificate(Path(scratch))
        fake = FakeOpenAI(
            args.host, args.port, ttft_ms=args.ttft_ms, chunks=args.chunks,
            interval_ms=args.interval_ms, api_key=args.api_key,
            tls=tls_context(Path(cert), Path(key or cert)) if cert else None,
        )  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with fake:
            trust = f" (trust it with SSL_CERT_FILE={cert})" if cert else ""
            print(f"fake-openai listening on {fake.base_url}{trust}", flush=True)
            await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m chatbot.fake_openai [--port 8001] [--ttft-ms 300] ...``."""
    parser = argparse.ArgumentParser(prog="python -m chatbot.fake_openai", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--ttft-ms", type=int, default=300, help="time to first content chunk")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per reply")
    parser.add_argument("--interval-ms", type=int, default=100, help="time between chunks")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--tls", action="store_true", help="serve https with a throwaway self-signed certificate"
    )
    parser.add_argument("--tls-cert", default=None, help="serve https with this certificate")
    parser.add_argument("--tls-key", default=None, help="its key (default: in --tls-cert)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args))
    else:
        uvloop.run(_serve(args))


if __name__ == "__main__":
    main()
