"""The peer: the same relay written "the obvious way" on FastAPI + uvicorn, for comparison.

    OPENAI_BASE_URL=http://127.0.0.1:8001/v1 OPENAI_API_KEY=sk-bench \\
        uvicorn bench.fastapi_peer:app --port 8002 --loop uvloop --http httptools

It speaks the subset of `/ws` that the load generator uses (docs/protocol.md): ``ready``, then
for each ``message`` a ``user`` echo, one ``delta`` per upstream chunk and ``done``, all with a
per-socket ``seq``. State is in memory, per socket: no sessions to resume, no replay, no stop,
no lease, no broker. The reply streams inline in the socket's receive loop with one
`AsyncOpenAI` client per process, one frame per chunk, the way a tutorial writes it. It also
serves the Flask app's ``POST /chat`` contract. It deliberately does not import `chatbot`.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from openai import AsyncOpenAI
from pydantic import BaseModel

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4.1-mini")
SYSTEM_PROMPT = os.environ.get("SYSTEM_PROMPT", "You are a helpful assistant. Answer concisely.")
HISTORY_MESSAGES = 40

app = FastAPI()
client = AsyncOpenAI()  # reads OPENAI_API_KEY and OPENAI_BASE_URL


class ChatRequest(BaseModel):
    message: str


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/chat", response_model=None)
async def chat(body: ChatRequest) -> dict[str, Any] | JSONResponse:
    if not body.message.strip():
        return JSONResponse({"error": "Message is required"}, status_code=400)
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": body.message},
        ],
    )
    return {"response": completion.choices[0].message.content}


@app.websocket("/ws")
async def chat_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    session = secrets.token_urlsafe(16)
    seq = 0
    history: list[dict[str, str]] = []
    await websocket.send_json(
        {"type": "ready", "session": session, "seq": seq, "model": MODEL, "demo": False}
    )
    try:
        while True:
            frame = await websocket.receive_json()
            text = frame.get("text") if isinstance(frame, dict) else None
            if frame.get("type") != "message" or not isinstance(text, str) or not text.strip():
                await websocket.send_json(
                    {"type": "error", "code": "invalid_frame", "message": "expected a message"}
                )
                continue
            msg_id = frame.get("id") or secrets.token_urlsafe(16)
            seq += 1
            await websocket.send_json({"type": "user", "seq": seq, "id": msg_id, "text": text})
            history.append({"role": "user", "content": text})
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, *history[-HISTORY_MESSAGES:]]
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                stream=True,
            )
            reply: list[str] = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    piece = chunk.choices[0].delta.content
                    reply.append(piece)
                    seq += 1
                    await websocket.send_json(
                        {"type": "delta", "seq": seq, "reply_to": msg_id, "text": piece}
                    )
            history.append({"role": "assistant", "content": "".join(reply)})
            seq += 1
            await websocket.send_json(
                {"type": "done", "seq": seq, "reply_to": msg_id, "reason": "stop"}
            )
    except WebSocketDisconnect:
        pass
