"""The smaller holes at the edge: forged text log lines, whole hostile Origins in the log, an
`http` page opening the socket of an `https` site, framing of the page, and replies cut by a
restart with the in-process broker ending silently."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest
import websockets
from quart.testing.connections import WebsocketResponseError

from chatbot.protocol import CloseCode

from .conftest import Socket
from .support.procs import ChatbotProcess
from .support.rawws import RawSocket

TOKEN = "a-long-enough-access-token"


async def test_text_logs_escape_what_clients_send() -> None:
    """With LOG_FORMAT=text, a path with CR/LF would start a forged line of its own, and ANSI
    escapes would rewrite the terminal of whoever reads the log."""
    chatbot = ChatbotProcess({"LOG_FORMAT": "text", "ACCESS_TOKEN": TOKEN}).start()
    try:
        forged = "/chat%0D%0A2026-01-01 00:00:00 CRITICAL chatbot: forged%1B[2J"
        async with httpx.AsyncClient(base_url=chatbot.url, timeout=10) as client:
            assert (await client.post(forged, json={"message": "hi"})).status_code in (401, 404)
            assert (await client.post("/chat", json={"message": "hi"})).status_code == 401
        origin = "https://evil.example/" + "x" * 5000
        sock = await RawSocket.open(chatbot.port, headers={"Origin": origin})
        sock.close()
        assert sock.status == 403
        chatbot.terminate()
        output = chatbot.output()
    finally:
        chatbot.stop()
    lines = output.splitlines()
    assert not any(
        line.startswith("2026-01-01") or ("forged" in line and "\\r\\n" not in line)
        for line in lines
    )
    assert "\x1b" not in output
    refused = [line for line in lines if "refused websocket from origin" in line]
    assert refused and all(len(line) < 400 for line in refused)


async def test_an_http_page_cannot_open_the_socket_of_an_https_site(app_with, settings) -> None:
    behind_tls = settings.replace(trusted_proxy_hops=1)
    async with app_with(behind_tls) as app:
        client = app.test_client()
        tls = {"Host": "chat.example", "X-Forwarded-Proto": "https", "X-Forwarded-For": "1.2.3.4"}
        for origin in ("http://chat.example", "null", "file://chat.example"):
            with pytest.raises(WebsocketResponseError) as refused:
                async with client.websocket("/ws", headers={**tls, "Origin": origin}):
                    pass
            assert refused.value.response.status_code == 403
        async with client.websocket(
            "/ws", headers={**tls, "Origin": "https://chat.example"}
        ) as raw:
            assert (await Socket(raw).recv())["type"] == "ready"
        # A plain socket from an https page: TLS ended at a proxy not declared. Still its own.
        plain = {"Host": "chat.example", "Origin": "https://chat.example"}
        async with client.websocket("/ws", headers=plain) as raw:
            assert (await Socket(raw).recv())["type"] == "ready"


async def test_no_other_site_may_frame_the_page(app_with, settings) -> None:
    async with app_with(settings) as app:
        page = await app.test_client().get("/")
    assert page.status_code == 200
    assert "frame-ancestors 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "SAMEORIGIN"


async def test_a_restart_with_the_in_process_broker_ends_cut_replies_visibly() -> None:
    """SIGTERM with SHUTDOWN_GRACE_S shorter than the reply: its clients hear `done
    interrupted` before the 1012, and need not guess that the reply will never end."""
    chatbot = ChatbotProcess({"SHUTDOWN_GRACE_S": "1", "DEMO_WORD_DELAY_S": "0.3"}).start()
    try:
        async with asyncio.timeout(20), websockets.connect(chatbot.ws_url) as ws:
            json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "message", "text": "a long one"}))
            while json.loads(await ws.recv())["type"] != "delta":
                pass
            assert chatbot.proc is not None
            chatbot.proc.send_signal(signal.SIGTERM)
            frames = []
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    frames.append(json.loads(await ws.recv()))
            assert ws.close_code == CloseCode.SERVICE_RESTART
        assert frames[-1]["type"] == "done" and frames[-1]["reason"] == "interrupted"
        assert await asyncio.to_thread(chatbot.proc.wait, 15) == 0
    finally:
        chatbot.stop()
