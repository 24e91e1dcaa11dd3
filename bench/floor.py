"""The stack's floor: the least a relay on chatbot's own stack can do, to know what it costs.

    OPENAI_BASE_URL=http://127.0.0.1:8001/v1 OPENAI_API_KEY=sk-bench \\
        python -m bench.floor --port 8003

A bare ASGI app on the libraries chatbot runs on, served the way chatbot serves it (Hypercorn
on uvloop, listen backlog 2,048, permessage-deflate declined): for each ``message`` it posts the
chat completion with one shared aiohttp session, splits the server-sent events itself and sends
one ``delta`` per content piece, inline in the socket's receive loop, then ``done``. It speaks
the subset of `/ws` the load generator checks (``ready``, ``user``, ``delta``, ``done`` with a
per-socket ``seq``), like `bench.fastapi_peer`.

Everything chatbot adds is missing on purpose: no history, log, resume or replay, no broker, no
sender task, no rate limits, admission, metrics, timeouts, retries or error handling. What it
spends per reply is what the stack spends before any of chatbot's code runs, so the gap to
chatbot is the price of its features, and a target this cannot meet no product on this stack
meets on this machine. Of `chatbot` it imports only how `chatbot serve` serves (its listen
backlog, its refusal of permessage-deflate, uvloop), so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from typing import Any

import aiohttp

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4.1-mini")
URL = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/")
HEADERS = {
    "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', '')}",
    "Content-Type": "application/json",
    "Accept-Encoding": "identity",
}
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_session: aiohttp.ClientSession | None = None


def _client() -> aiohttp.ClientSession:
    global _session
    if _session is None:
        connector = aiohttp.TCPConnector(limit=0)
        _session = aiohttp.ClientSession(connector=connector, headers=HEADERS)
    return _session


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})

    async def frame(data: dict[str, Any]) -> None:
        await send({"type": "websocket.send", "text": _ENCODE(data)})

    seq = 0
    ready = {"type": "ready", "session": secrets.token_urlsafe(16), "seq": 0, "model": MODEL}
    await frame({**ready, "demo": False})
    while (message := await receive())["type"] == "websocket.receive":
        text = json.loads(message["text"])["text"]
        msg_id = secrets.token_urlsafe(16)
        seq += 1
        await frame({"type": "user", "seq": seq, "id": msg_id, "text": text})
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": True}
        async with _client().post(f"{URL}/chat/completions", data=_ENCODE(body)) as response:
            pending = b""
            while data := await response.content.readany():
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if line.startswith(b"data: {"):
                        choice = json.loads(line[6:].decode())["choices"][0]
                        piece = choice["delta"].get("content")
                        if piece:
                            seq += 1
                            delta = {"type": "delta", "seq": seq, "reply_to": msg_id}
                            await frame({**delta, "text": piece})
        seq += 1
        await frame({"type": "done", "seq": seq, "reply_to": msg_id, "reason": "stop"})


def main() -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from chatbot.cli import LISTEN_BACKLOG, run
    from chatbot.patches import hypercorn as hypercorn_fixes
    from chatbot.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    args = parser.parse_args()

    config = Config()
    hypercorn_fixes.install(
        config.websocket_max_message_size,
        deflate=False,
        close_linger_s=Settings().ws_close_linger_s,
    )
    config.bind = [f"{args.host}:{args.port}"]
    config.backlog = LISTEN_BACKLOG
    config.accesslog = None
    run(serve(app, config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
