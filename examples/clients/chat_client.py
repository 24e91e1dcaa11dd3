"""A `/ws` chat client to paste into your Python code (needs `pip install websockets`).

`await ask(url, text)` sends one message and returns the whole reply, calling `on_delta` with
each piece as it streams. It pings every 25 s (the server closes a socket silent for
WS_IDLE_TIMEOUT_S), and when the connection drops or the server restarts (close code 1012) it
reconnects with `session` and `after` and picks up where it was: nothing lost, nothing twice,
and the message is sent again only if the server never took it. tests/test_migrating.py runs
this file against a real server. Protocol: docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from urllib.parse import urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

PING_EVERY_S = 25.0
RETRY_FIRST_S, RETRY_MOST_S = 0.5, 10.0


class ChatError(Exception):
    """The server refused the message or the reply failed; `code` is the protocol's slug."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


async def ask(
    url: str,
    text: str,
    session: str | None = None,
    on_delta: Callable[[str], object] = lambda piece: None,
    token: str | None = None,
) -> tuple[str, str]:
    """Send `text` on `session` (a new one when None) at `url` (`ws://host/ws`); return
    `(reply, session)`. Pass `session` back next time to continue the conversation."""
    message_id = uuid.uuid4().hex
    last_seq: int | None = None  # the last conversation event seen
    accepted = False  # the server logged our message (its `user` event came back)
    pieces: list[str] = []
    retry_s = RETRY_FIRST_S
    while True:
        query = {"session": session, "after": last_seq, "token": token}
        address = url + "?" + urlencode({k: v for k, v in query.items() if v is not None})
        try:
            async with connect(address) as ws:
                ready = json.loads(await ws.recv())
                if ready["session"] != session:  # new (or expired): nothing there to resume
                    session, last_seq, accepted, pieces = ready["session"], ready["seq"], False, []
                elif last_seq is None:
                    last_seq = ready["seq"]
                retry_s = RETRY_FIRST_S
                replay_end = ready["seq"]  # events up to here were logged before we came back
                if not accepted and last_seq >= replay_end:
                    await ws.send(json.dumps({"type": "message", "id": message_id, "text": text}))
                pinger = asyncio.create_task(_ping(ws))
                try:
                    async for raw in ws:
                        frame = json.loads(raw)
                        seq = frame.get("seq")
                        if seq is not None:
                            if seq <= last_seq:
                                continue  # seen before the reconnect
                            last_seq = seq
                        kind = frame["type"]
                        if kind == "user" and frame["id"] == message_id:
                            accepted = True
                        elif kind == "delta" and frame["reply_to"] == message_id:
                            pieces.append(frame["text"])
                            on_delta(frame["text"])
                        elif kind == "error" and message_id in (
                            frame.get("id"),
                            frame.get("reply_to"),
                        ):
                            raise ChatError(frame["code"], frame["message"])
                        elif kind == "done" and frame["reply_to"] == message_id:
                            return "".join(pieces), session
                        if seq == replay_end and not accepted:  # the replay did not have it
                            await ws.send(
                                json.dumps({"type": "message", "id": message_id, "text": text})
                            )
                finally:
                    pinger.cancel()
        except (ConnectionClosed, OSError, TimeoutError):
            pass  # dropped, refused or restarting (1012): reconnect and resume
        await asyncio.sleep(retry_s)
        retry_s = min(retry_s * 2, RETRY_MOST_S)


async def _ping(ws: object) -> None:
    while True:
        await asyncio.sleep(PING_EVERY_S)
        await ws.send('{"type":"ping"}')  # type: ignore[attr-defined]


if __name__ == "__main__":
    import sys

    reply, session = asyncio.run(
        ask(sys.argv[1], sys.argv[2], on_delta=lambda p: print(p, end="", flush=True))
    )
    print(f"\n(session {session})")
