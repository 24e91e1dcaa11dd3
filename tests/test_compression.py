"""WebSocket compression is declined by default (lean sockets) and accepted when configured."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from .support.procs import ChatbotProcess


@pytest.mark.parametrize(("setting", "negotiated"), [(None, False), ("true", True)])
def test_permessage_deflate_follows_the_setting(setting: str | None, negotiated: bool) -> None:
    env = {} if setting is None else {"WS_PERMESSAGE_DEFLATE": setting}
    server = ChatbotProcess(env).start()
    try:

        async def handshake() -> tuple[str | None, dict]:
            async with asyncio.timeout(10):
                async with websockets.connect(server.ws_url) as ws:  # offers deflate
                    extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
                    return extensions, json.loads(await ws.recv())

        extensions, ready = asyncio.run(handshake())
        assert ready["type"] == "ready"
        assert (extensions is not None and "permessage-deflate" in extensions) is negotiated
    finally:
        server.stop()
