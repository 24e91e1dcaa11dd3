"""The load generator: N concurrent chat sessions against one server, in its own process.

    python -m bench.loadgen --mode ws --url ws://127.0.0.1:8000/ws --n 1000 --out r.json

Modes:

- ``ws``: each session connects to ``/ws``, waits for ``ready``, sends ``--messages`` messages one
  after the other (the next when the previous reply's ``done`` arrives) and checks every frame:
  ``seq`` contiguous, no ``error``, ``done`` with reason ``stop``, and the reply text equal to the
  fake upstream's ``reply_text(prompt, chunks)``. With ``--follow-url`` (another instance), each
  session also opens a second socket there on the same session (``?session=ID``) before its
  first message, and checks every reply it receives the same way: every event then crosses
  from the instance that writes it to the other one (Redis pub/sub). A session ends when both
  sockets have had every reply.
- ``http``: ``POST /chat`` with ``{"message": ...}`` and checks ``{"response": ...}``.
- ``upstream``: streams a chat completion straight from the fake OpenAI server over raw HTTP/1.1
  (h11), to know the upstream's own latency under the same client.
- ``idle``: opens N sockets, waits for every ``ready``, reports ``held`` on stdout and keeps them
  open, doing nothing, until a line arrives on stdin (or ``--hold-s`` passes).

Sessions start together (``--spread-s 0``: a burst) or evenly spread over ``--spread-s`` seconds.
With ``--sync`` the process prints ``ready`` once imported and waits for ``go`` on stdin, so the
caller can sample the server's CPU time right before the load starts. Every wait is bounded by
``--deadline-s``: a session still running then counts as a ``timeout`` error.

The result is one JSON object (``--out``): raw samples in seconds, error counts by kind, a few
error examples, the wall time from the start to the last reply, and this process's CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from chatbot.fake_openai import reply_text

MAX_ERROR_EXAMPLES = 8


class SessionError(Exception):
    """A session broke the contract; `kind` is the error class counted in the report."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass
class Config:
    mode: str
    url: str
    n: int
    offset: int
    messages: int
    spread_s: float
    chunks: int
    deadline_s: float
    compression: str | None
    connect_concurrency: int
    hold_s: float
    sessions_per_ip: int
    follow_url: str | None = None


@dataclass
class Results:
    """What every session adds to: samples in seconds, errors by kind."""

    connect: list[float] = field(default_factory=list)
    ttfd: list[float] = field(default_factory=list)
    first_text: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    replies_ok: int = 0
    last_end: float = 0.0
    opened: int = 0
    sockets: int = 0  # WebSocket handshakes completed
    deflated: int = 0  # of which negotiated permessage-deflate
    deltas: int = 0  # `delta` frames of the replies that checked out (ws mode)
    followed: int = 0  # replies that checked out on the follower sockets (--follow-url)

    def handshake(self, extensions: str | None) -> None:
        """A handshake completed; `extensions` is the response's Sec-WebSocket-Extensions."""
        self.sockets += 1
        if "permessage-deflate" in (extensions or ""):
            self.deflated += 1

    def fail(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < MAX_ERROR_EXAMPLES:
            self.examples.append(f"{kind}: {detail}"[:300])

    def reply_done(self) -> None:
        self.replies_ok += 1
        self.last_end = max(self.last_end, time.perf_counter())


def prompt_for(session: int, message: int) -> str:
    return f"bench session {session} message {message}: hello there"


def source_address(cfg: Config, index: int) -> str:
    """The loopback address session `index` connects from: `--sessions-per-ip` sessions share
    one, as users behind one NAT would, so per-IP limits see many clients, not one. All of
    127.0.0.0/8 is loopback on Linux; 127.0.0.1 (the servers' address) is left out."""
    k = 2 + (cfg.offset + index) // cfg.sessions_per_ip
    if k >= 2**24 - 1:
        raise ValueError("more clients than loopback addresses")
    return f"127.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}"


# -- WebSocket sessions ---------------------------------------------------------------------------


async def ws_session(cfg: Config, index: int, t_start: float, res: Results) -> None:
    await asyncio.sleep(max(0.0, t_start + cfg.spread_s * index / cfg.n - time.perf_counter()))
    t0 = time.perf_counter()
    session: Conversation | None = None
    follower: Follower | None = None
    try:
        async with asyncio.timeout(cfg.deadline_s - (t0 - t_start)):
            session = await _open(cfg, cfg.url, Conversation(cfg, index, t0, res))
            # The connection is made; its handshake's answer and `ready` may still be on their
            # way (a message sent before them is refused by the client protocol).
            await session.ready
            if cfg.follow_url is not None:
                url = f"{cfg.follow_url}?session={session.session}"
                follower = await _open(cfg, url, Follower(cfg, index, t0, res, url))
                await follower.ready
            session.start()
            await session.finished
            if follower is not None:
                await follower.finished
    except SessionError as exc:
        res.fail(exc.kind, str(exc))
    except TimeoutError:
        res.fail("timeout", f"session {index} still running at the deadline")
    except InvalidStatus as exc:
        res.fail(f"http_{exc.response.status_code}", f"session {index}: handshake refused")
    except (OSError, InvalidHandshake) as exc:
        res.fail("connect", f"session {index}: {exc!r}")
    finally:
        for conversation in (session, follower):
            if conversation is not None:
                await conversation.close()


async def _open(cfg: Config, url: str, conversation: C) -> C:
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    await loop.create_connection(
        lambda: conversation,
        parts.hostname,
        parts.port,
        local_addr=(source_address(cfg, conversation.index), 0),
    )
    return conversation


class Conversation(asyncio.Protocol):
    """One ``ws`` session: the `websockets` client's sans-I/O protocol, driven from this asyncio
    protocol's callbacks, checking each frame as it arrives. The load generator shares a core with
    the fake upstream, and `websockets`' asyncio connection (a task wake-up, a queue and an
    assembler per frame) cost about half of its CPU at steady N=1,000 (py-spy), enough to
    saturate that core and delay the very timings it records.

    It sends ``--messages`` messages one after the other, the next when the previous reply's
    ``done`` arrives; `finished` resolves when the last reply checked out (or with the
    `SessionError` of the first frame that broke the contract)."""

    measured = True  # its replies are the run's samples and delta counts

    def __init__(
        self, cfg: Config, index: int, t0: float, res: Results, url: str | None = None
    ) -> None:
        self.cfg, self.index, self.t0, self.res = cfg, index, t0, res
        extensions = enable_client_permessage_deflate(None) if cfg.compression else None
        uri = parse_uri(url or cfg.url)
        self.ws = ClientProtocol(uri, extensions=extensions, max_size=None)
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()  # `ready` came
        self.finished: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.session = ""  # the session `ready` named
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.seq = -1  # the last seq seen; -1 until `ready`
        self.k = -1  # the message in flight; -1 before the first
        self.parts: list[str] = []
        self.expected = ""
        self.t_send = self.t_first = 0.0

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ws.send_request(self.ws.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        try:
            for event in self.ws.events_received():
                if not self.open:
                    self._handshake(event)
                else:
                    self._frame(event)
        except SessionError as exc:
            self._end(exc)
        self._flush()

    def eof_received(self) -> None:
        self.ws.receive_eof()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.ws.handshake_exc is not None:
            self._end(self.ws.handshake_exc)
        self._end(SessionError("closed", f"session {self.index}: the connection closed"))

    # the session

    def _handshake(self, response: Any) -> None:
        if self.ws.handshake_exc is not None:
            self._end(self.ws.handshake_exc)
            return
        self.open = True
        self.res.connect.append(time.perf_counter() - self.t0)
        self.res.handshake(response.headers.get("Sec-WebSocket-Extensions"))

    def _frame(self, frame: Any) -> None:
        if frame.opcode is not Opcode.TEXT:
            return  # pings are answered by the protocol; a close ends the connection
        if not frame.fin:
            raise SessionError("protocol", "a fragmented frame (the server sends whole ones)")
        event = json.loads(frame.data)
        kind = event.get("type")
        if self.seq < 0:
            if kind != "ready":
                raise SessionError("protocol", f"expected ready, got {event}")
            self.seq, self.session = event["seq"], event["session"]
            self.ready.set_result(None)
            if self.cfg.follow_url is None:
                self._next()
            return
        if kind == "error":
            raise SessionError(f"error_{event.get('code')}", event.get("message", ""))
        if kind == "queued":  # admission control: served later (transient, no seq)
            return
        if event.get("seq") != self.seq + 1:
            raise SessionError("seq", f"expected seq {self.seq + 1}, got {event}")
        self.seq += 1
        if kind == "delta":
            if not self.parts:
                self.t_first = time.perf_counter()
            self.parts.append(event["text"])
            self.res.deltas += self.measured
        elif kind == "done":
            if event.get("reason") != "stop":
                raise SessionError("done_reason", str(event))
            self._reply_done()
        elif kind != "user":
            raise SessionError("protocol", f"unexpected frame {event}")

    def _reply_done(self) -> None:
        t_end, res = time.perf_counter(), self.res
        text = "".join(self.parts)
        if text != self.expected:
            raise SessionError("text", f"reply {text[:80]!r} != {self.expected[:80]!r}")
        res.ttfd.append(self.t_first - self.t_send)
        res.total.append(t_end - self.t_send)
        if self.k == 0:
            res.first_text.append(self.t_first - self.t0)
        res.reply_done()
        self._next()

    def start(self) -> None:
        """Send the first message (with --follow-url, once the follower is ready too)."""
        if self.k < 0:
            self._next()
            self._flush()

    def _next(self) -> None:
        self.k += 1
        if self.k == self.cfg.messages:
            return self._end(None)
        prompt = prompt_for(self.cfg.offset + self.index, self.k)
        self.expected = reply_text(prompt, self.cfg.chunks)
        self.parts = []
        self.t_send = time.perf_counter()
        message = {"type": "message", "id": f"m{self.k}", "text": prompt}
        self.ws.send_text(json.dumps(message).encode())

    def _end(self, exc: BaseException | None) -> None:
        for future in (self.ready, self.finished):
            if future.done():
                continue
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(exc)
                future.exception()  # awaited, it raises; not awaited, asyncio need not warn

    def _flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = self.ws.data_to_send()
        if data:
            self.transport.write(b"".join(data))
        if self.ws.close_expected():
            self.transport.close()

    async def close(self) -> None:
        """Close the socket with 1000 and wait (up to 2 s) for the server to hang up."""
        if self.transport is None or self.lost.done():
            return
        if self.open:
            if self.ws.state is State.OPEN:
                self.ws.send_close(1000)
                self._flush()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await asyncio.shield(self.lost)
        self.transport.abort()


class Follower(Conversation):
    """The second socket of a session (--follow-url): sends nothing, and checks every reply the
    session's `Conversation` asks for as that one does (contiguous seqs, the exact text)."""

    measured = False

    def _frame(self, frame: Any) -> None:
        super()._frame(frame)
        if self.k < 0 and self.seq >= 0:  # `ready`: the first reply is the one to expect
            self._expect(0)

    def _reply_done(self) -> None:
        text = "".join(self.parts)
        if text != self.expected:
            raise SessionError("text", f"followed {text[:80]!r} != {self.expected[:80]!r}")
        self.res.followed += 1
        if self.k + 1 == self.cfg.messages:
            return self._end(None)
        self._expect(self.k + 1)

    def _expect(self, k: int) -> None:
        self.k, self.parts = k, []
        self.expected = reply_text(prompt_for(self.cfg.offset + self.index, k), self.cfg.chunks)


C = TypeVar("C", bound=Conversation)


# -- raw HTTP/1.1: POST /chat and the bare upstream --------------------------------------------


class HTTPConnection:
    """One client connection speaking HTTP/1.1 through h11, reconnecting when the server closes
    after a response (gunicorn's sync workers do). No pool: each session is its own client, and
    the load generator, which shares a core with the fake upstream, stays cheap."""

    def __init__(self, url: str, source: str) -> None:
        self.url = urlsplit(url)
        self.source = source
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.conn: Any = None

    async def open(self) -> None:
        import h11

        self.reader, self.writer = await asyncio.open_connection(
            self.url.hostname, self.url.port, local_addr=(self.source, 0)
        )
        self.conn = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def post(self, payload: dict[str, Any], on_data: Any) -> int:
        """Send a JSON POST; call `on_data(bytes)` for each piece of the body; the status."""
        import h11

        if self.conn is None or self.conn.our_state is not h11.IDLE:
            self.close()
            await self.open()
        assert self.reader is not None and self.writer is not None
        body = json.dumps(payload).encode()
        headers = [
            ("host", f"{self.url.hostname}:{self.url.port}"),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("authorization", "Bearer sk-bench"),
        ]
        request = h11.Request(method="POST", target=self.url.path or "/", headers=headers)
        send = self.conn.send
        self.writer.write(send(request) + send(h11.Data(data=body)) + send(h11.EndOfMessage()))
        status = 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                on_data(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise SessionError("closed", "the server closed the connection mid-response")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return status


Exchange = Callable[[HTTPConnection, str, bool, float], Awaitable[None]]


async def _over_http(
    cfg: Config, index: int, t_start: float, res: Results, what: str, exchange: Exchange
) -> None:
    """One keep-alive HTTP/1.1 connection sending `--messages` requests, each handled by
    `exchange(client, prompt, first, t0)`; failures are recorded alike for every HTTP mode."""
    await asyncio.sleep(max(0.0, t_start + cfg.spread_s * index / cfg.n - time.perf_counter()))
    t0 = time.perf_counter()
    client = HTTPConnection(cfg.url, source_address(cfg, index))
    try:
        async with asyncio.timeout(cfg.deadline_s - (t0 - t_start)):
            await client.open()
            res.connect.append(time.perf_counter() - t0)
            for k in range(cfg.messages):
                await exchange(client, prompt_for(cfg.offset + index, k), k == 0, t0)
                res.reply_done()
    except SessionError as exc:
        res.fail(exc.kind, str(exc))
    except TimeoutError:
        res.fail("timeout", f"{what} {index} still running at the deadline")
    except (OSError, ValueError) as exc:
        res.fail("connect", f"{what} {index}: {exc!r}")
    finally:
        client.close()


async def http_session(cfg: Config, index: int, t_start: float, res: Results) -> None:
    """POST /chat `{"message"}` -> `{"response"}`, `--messages` times on one connection."""

    async def chat(client: HTTPConnection, prompt: str, first: bool, t0: float) -> None:
        body = bytearray()
        t_send = time.perf_counter()
        status = await client.post({"message": prompt}, body.extend)
        t_end = time.perf_counter()
        if status != 200:
            raise SessionError(f"http_{status}", bytes(body[:200]).decode(errors="replace"))
        if json.loads(body).get("response") != reply_text(prompt, cfg.chunks):
            raise SessionError("text", bytes(body[:200]).decode(errors="replace"))
        res.total.append(t_end - t_send)
        if first:
            res.first_text.append(t_end - t0)

    await _over_http(cfg, index, t_start, res, "request", chat)


async def upstream_session(cfg: Config, index: int, t_start: float, res: Results) -> None:
    """Stream chat completions straight from the fake: its own latency under this client."""

    async def stream(client: HTTPConnection, prompt: str, first: bool, t0: float) -> None:
        sse = _SSE()
        payload = {
            "model": "gpt-4.1-mini",
            "stream": True,
            "messages": [{"role": "user", "content": prompt}],
        }
        t_send = time.perf_counter()
        status = await client.post(payload, sse.feed)
        t_end = time.perf_counter()
        if status != 200:
            raise SessionError(f"http_{status}", f"stream {index}")
        if "".join(sse.parts) != reply_text(prompt, cfg.chunks):
            raise SessionError("text", f"stream {index}: {''.join(sse.parts)[:80]!r}")
        res.ttfd.append(sse.t_first - t_send)
        res.total.append(t_end - t_send)
        if first:
            res.first_text.append(sse.t_first - t0)

    await _over_http(cfg, index, t_start, res, "stream", stream)


class _SSE:
    """Server-sent chat-completion chunks: the content pieces and when the first came."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.t_first = 0.0
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        *events, self._buffer = (self._buffer + data).split(b"\n\n")
        for raw in events:
            if not raw.startswith(b"data: ") or raw == b"data: [DONE]":
                continue
            choices = json.loads(raw[6:]).get("choices") or [{}]
            content = (choices[0].get("delta") or {}).get("content")
            if content:
                if not self.parts:
                    self.t_first = time.perf_counter()
                self.parts.append(content)


# -- idle sockets ---------------------------------------------------------------------------------


async def idle_open(cfg: Config, index: int, gate: asyncio.Semaphore, res: Results) -> Any:
    """Open one socket and read its `ready`; the connection, or None if it failed."""
    ws = None
    try:
        async with asyncio.timeout(cfg.deadline_s):
            async with gate:
                t0 = time.perf_counter()
                ws = await connect(
                    cfg.url,
                    compression=cfg.compression,
                    open_timeout=None,
                    ping_interval=None,
                    close_timeout=2,
                    proxy=None,
                    local_addr=(source_address(cfg, index), 0),
                )
                res.connect.append(time.perf_counter() - t0)
                res.handshake(ws.response.headers.get("Sec-WebSocket-Extensions"))
                ready = json.loads(await ws.recv())
                if ready.get("type") != "ready":
                    raise SessionError("protocol", f"expected ready, got {ready}")
        res.opened += 1
        return ws
    except SessionError as exc:
        res.fail(exc.kind, str(exc))
    except TimeoutError:
        res.fail("timeout", f"socket {index} not ready at the deadline")
    except InvalidStatus as exc:
        res.fail(f"http_{exc.response.status_code}", f"socket {index}: handshake refused")
    except ConnectionClosed as exc:
        res.fail("closed", f"socket {index}: {exc}")
    except (OSError, InvalidHandshake) as exc:
        res.fail("connect", f"socket {index}: {exc!r}")
    if ws is not None:
        ws.transport.abort()
    return None


WARM_UP_PROMPT = "warm-up [[fake:ttft_ms=0]] [[fake:interval_ms=0]]"  # an instant reply


async def warm_up(cfg: Config, sessions: int = 4) -> None:
    """A few quick exchanges before the measured load, so the server's one-off costs (lazy
    imports, first-use caches, pools) fall outside its measured CPU time and baseline RSS. They
    come from an address no measured session uses."""
    source = "127.255.255.254"

    async def socket(chat: bool) -> None:
        async with connect(
            cfg.url, compression=cfg.compression, proxy=None, local_addr=(source, 0)
        ) as ws:
            await ws.recv()
            if chat:
                await ws.send(json.dumps({"type": "message", "text": WARM_UP_PROMPT}))
                while json.loads(await ws.recv()).get("type") not in ("done", "error"):
                    pass

    async def post() -> None:
        client = HTTPConnection(cfg.url, source)
        try:
            await client.post({"message": WARM_UP_PROMPT}, lambda data: None)
        finally:
            client.close()

    async with asyncio.timeout(30):
        if cfg.mode == "ws":
            await asyncio.gather(*(socket(True) for _ in range(sessions)))
        elif cfg.mode == "idle":
            await asyncio.gather(*(socket(False) for _ in range(5 * sessions)))
        elif cfg.mode == "http":
            for _ in range(2):
                await asyncio.gather(*(post() for _ in range(sessions)))
    await asyncio.sleep(0.2)


async def run_idle(cfg: Config, res: Results) -> None:
    """Open every socket (a bounded number at a time), report `held`, wait for the caller."""
    gate = asyncio.Semaphore(cfg.connect_concurrency)
    sockets = await asyncio.gather(*(idle_open(cfg, i, gate, res) for i in range(cfg.n)))
    res.last_end = time.perf_counter()
    print(f"held {res.opened}", flush=True)
    try:
        async with asyncio.timeout(cfg.hold_s):
            await asyncio.to_thread(sys.stdin.readline)
    except TimeoutError:
        pass
    # Still open? A socket the server closed while held is an error too.
    for ws in sockets:
        if ws is not None and ws.close_code is not None:
            res.fail("closed", f"idle socket closed by the server: {ws.close_code}")
    async with asyncio.timeout(30):
        await asyncio.gather(*(ws.close() for ws in sockets if ws is not None))


# -- driver ---------------------------------------------------------------------------------------


async def run(cfg: Config, sync: bool) -> dict[str, Any]:
    res = Results()
    if sync:  # the caller starts the server meanwhile, then says "warm"
        print("loaded", flush=True)
        await _wait_line()
    await warm_up(cfg)
    if sync:  # the caller samples the server's CPU time, then says "go"
        print("ready", flush=True)
        await _wait_line()
    cpu0 = _cpu_s()
    t_start = time.perf_counter()
    if cfg.mode == "idle":
        await run_idle(cfg, res)
    else:
        if cfg.mode == "ws":
            jobs = [ws_session(cfg, i, t_start, res) for i in range(cfg.n)]
        elif cfg.mode == "http":
            jobs = [http_session(cfg, i, t_start, res) for i in range(cfg.n)]
        else:
            jobs = [upstream_session(cfg, i, t_start, res) for i in range(cfg.n)]
        async with asyncio.timeout(cfg.deadline_s + 15):  # sessions bound themselves; a backstop
            await asyncio.gather(*jobs)
    cpu = _cpu_s() - cpu0
    return {
        "mode": cfg.mode,
        "n": cfg.n,
        "messages": cfg.messages,
        "replies_ok": res.replies_ok,
        "replies_expected": cfg.n * cfg.messages if cfg.mode != "idle" else 0,
        "opened": res.opened,
        "sockets": res.sockets,
        "deflated": res.deflated,
        "deltas": res.deltas,
        "followed": res.followed,
        "errors": dict(res.errors),
        "error_examples": res.examples,
        "wall_s": (res.last_end or time.perf_counter()) - t_start,
        "client_cpu_s": cpu,
        "samples": {
            "connect": res.connect,
            "ttfd": res.ttfd,
            "first_text": res.first_text,
            "total": res.total,
        },
    }


async def _wait_line() -> None:
    async with asyncio.timeout(120):
        if not await asyncio.to_thread(sys.stdin.readline):
            raise SystemExit("stdin closed: the caller is gone")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--mode", choices=("ws", "http", "upstream", "idle"), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, required=True, help="concurrent sessions")
    parser.add_argument("--offset", type=int, default=0, help="first session number")
    parser.add_argument("--messages", type=int, default=1, help="messages per session")
    parser.add_argument("--spread-s", type=float, default=0.0, help="0: all start at once")
    parser.add_argument("--chunks", type=int, default=20, help="the fake upstream's --chunks")
    parser.add_argument("--deadline-s", type=float, default=60.0)
    parser.add_argument("--compression", choices=("deflate", "none"), default="deflate")
    parser.add_argument("--connect-concurrency", type=int, default=200, help="idle mode")
    parser.add_argument("--hold-s", type=float, default=60.0, help="idle mode: longest hold")
    parser.add_argument("--sessions-per-ip", type=int, default=10, help="see source_address")
    parser.add_argument(
        "--follow-url", help="ws mode: each session's second socket, on another instance"
    )
    parser.add_argument("--sync", action="store_true", help="print ready, wait for go on stdin")
    parser.add_argument("--out", help="write the JSON result here (default: stdout)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.messages < 1 or args.deadline_s <= 0:
        parser.error("--n and --messages must be >= 1 and --deadline-s > 0")
    cfg = Config(
        mode=args.mode,
        url=args.url,
        n=args.n,
        offset=args.offset,
        messages=args.messages,
        spread_s=args.spread_s,
        chunks=args.chunks,
        deadline_s=args.deadline_s,
        compression=None if args.compression == "none" else "deflate",
        connect_concurrency=args.connect_concurrency,
        hold_s=args.hold_s,
        sessions_per_ip=args.sessions_per_ip,
        follow_url=args.follow_url,
    )
    raise_nofile()
    import uvloop

    result = uvloop.run(run(cfg, args.sync))
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)
    else:
        print(text, flush=True)


if __name__ == "__main__":
    main()
