"""Connection churn against a real server process short of descriptors (`ulimit -n`): a closed
socket gives its descriptor back at once, handshakes per address are rate-limited, and running
out of descriptors is logged and shows in /readyz and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from .support.procs import ChatbotProcess
from .support.rawws import RawSocket, open_descriptors, status_kib
from .support.waiting import wait_until

MIB = 1024


def short_of_descriptors(limit: int, env: dict[str, str]) -> ChatbotProcess:
    chatbot = ChatbotProcess(env)
    chatbot.max_descriptors = limit
    return chatbot.start()


@pytest.fixture
def churned() -> Iterator[ChatbotProcess]:
    chatbot = short_of_descriptors(256, {"RATE_LIMIT_HANDSHAKES_IP": "100000/minute"})
    yield chatbot
    chatbot.stop()


async def test_a_socket_dropped_without_a_close_frees_its_descriptor_at_once(
    churned: ChatbotProcess,
) -> None:
    """1,000 clients in a row that connect, read `ready` and drop the connection (no close
    frame), with 256 descriptors: Hypercorn held each for a ping interval (20 s), so the 250th
    found none left and every later one was reset, with nothing logged."""
    baseline = open_descriptors(churned.pid)
    rss = status_kib(churned.pid, "VmRSS")
    for _ in range(1_000):
        async with asyncio.timeout(5):
            sock = await RawSocket.open(churned.port)
            assert sock.status == 101
            assert '"ready"' in await sock.read_text()
            sock.close()

    async def released() -> bool:
        return open_descriptors(churned.pid) <= baseline + 1

    await wait_until(released, timeout_s=2)
    assert status_kib(churned.pid, "VmRSS") - rss < 8 * MIB


async def test_handshakes_per_address_are_rate_limited() -> None:
    chatbot = ChatbotProcess({"RATE_LIMIT_HANDSHAKES_IP": "5/minute"}).start()
    try:
        for _ in range(5):
            async with asyncio.timeout(5), websockets.connect(chatbot.ws_url) as ws:
                await ws.recv()
        with pytest.raises(InvalidStatus) as refused:
            async with asyncio.timeout(5):
                await websockets.connect(chatbot.ws_url)
        assert refused.value.response.status_code == 429
        assert 0 < int(refused.value.response.headers["Retry-After"]) <= 60
        assert b"too many connections from this address" in refused.value.response.body
        # Another address is not held back.
        async with asyncio.timeout(5):
            async with websockets.connect(chatbot.ws_url, local_addr=("127.0.0.2", 0)) as ws:
                await ws.recv()
    finally:
        chatbot.stop()


async def test_running_out_of_descriptors_is_logged_and_reported() -> None:
    env = {"MAX_SOCKETS_PER_IP": "1000", "RATE_LIMIT_HANDSHAKES_IP": "100000/minute"}
    chatbot = short_of_descriptors(128, env)
    held: list[RawSocket] = []
    try:
        while len(held) < 200:  # until the server has no descriptor left for one more
            try:
                async with asyncio.timeout(5):
                    sock = await RawSocket.open(chatbot.port)
                    await sock.read_text()
            except (ConnectionError, asyncio.IncompleteReadError):
                break
            held.append(sock)
        assert len(held) < 200
        for sock in held[:8]:  # room for the probes below (exhausted is within 16 of the limit)
            sock.close()
        del held[:8]
        async with httpx.AsyncClient(base_url=chatbot.url, timeout=5) as client:

            async def said(status: int) -> bool:
                try:
                    return (await client.get("/readyz")).status_code == status
                except httpx.TransportError:  # reset: the closed sockets are not released yet
                    return False

            await wait_until(lambda: said(503), timeout_s=5)
            body = (await client.get("/readyz")).json()
            assert body["status"] == "unavailable" and body["descriptors"]["exhausted"] is True
            assert body["descriptors"]["limit"] == 128
            assert "chatbot_descriptors_exhausted 1.0" in (await client.get("/metrics")).text
            assert "out of file descriptors" in chatbot.output()
            for sock in held:
                sock.close()
            held.clear()
            await wait_until(lambda: said(200), timeout_s=5)
        assert "file descriptors available again" in chatbot.output()
    finally:
        for sock in held:
            sock.close()
        chatbot.stop()
