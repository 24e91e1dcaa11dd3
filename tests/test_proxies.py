"""Behind the shipped balancer configs (docs/deploy/haproxy.cfg and nginx.conf, run by the real
HAProxy and nginx), each user is its own address to the per-address limits, and no client picks
its own address with an X-Forwarded-For header."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from .support.procs import ChatbotProcess, HAProxyProcess, NginxProcess
from .support.waiting import wait_until

SOCKETS_PER_IP = 2


@pytest.fixture(scope="module")
def server() -> Iterator[ChatbotProcess]:
    env = {"TRUSTED_PROXY_HOPS": "1", "MAX_SOCKETS_PER_IP": str(SOCKETS_PER_IP)}
    chatbot = ChatbotProcess(env).start()
    yield chatbot
    chatbot.stop()


@pytest.fixture(params=["haproxy", "nginx"])
async def balancer(
    request: pytest.FixtureRequest, server: ChatbotProcess
) -> AsyncIterator[HAProxyProcess | NginxProcess]:
    kind = HAProxyProcess if request.param == "haproxy" else NginxProcess
    lb = kind([server.port] * 3).start()
    try:
        async with httpx.AsyncClient(timeout=2) as client:

            async def routed() -> bool:
                try:
                    return (await client.get(lb.url + "/healthz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(routed, timeout_s=20)
        yield lb
    finally:
        lb.stop()


async def open_socket(
    stack: AsyncExitStack, url: str, source: str, forwarded_for: str | None = None
) -> None:
    """A socket from the loopback address `source` (any 127.x.y.z is this machine), with an
    X-Forwarded-For of the client's own making if given; raises InvalidStatus when refused."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else None
    async with asyncio.timeout(10):
        ws = await websockets.connect(url, additional_headers=headers, local_addr=(source, 0))
        stack.push_async_callback(ws.close)
        assert json.loads(await ws.recv())["type"] == "ready"


async def test_each_user_is_an_address_of_its_own(
    balancer: HAProxyProcess | NginxProcess,
) -> None:
    async with AsyncExitStack() as stack:
        for _ in range(SOCKETS_PER_IP):
            await open_socket(stack, balancer.ws_url, "127.0.0.2")
        with pytest.raises(InvalidStatus) as refused:
            await open_socket(stack, balancer.ws_url, "127.0.0.2")
        assert refused.value.response.status_code == 429
        # Another user, behind the same balancer, is not locked out by the first one's sockets.
        await open_socket(stack, balancer.ws_url, "127.0.0.3")


async def test_a_client_cannot_pick_its_address_with_x_forwarded_for(
    balancer: HAProxyProcess | NginxProcess,
) -> None:
    async with AsyncExitStack() as stack:
        for n in range(SOCKETS_PER_IP):
            await open_socket(stack, balancer.ws_url, "127.0.0.4", f"10.6.6.{n}")
        for spoofed in ("10.6.6.9", "10.6.6.9, 10.7.7.7", "127.0.0.5"):
            with pytest.raises(InvalidStatus) as refused:
                await open_socket(stack, balancer.ws_url, "127.0.0.4", spoofed)
            assert refused.value.response.status_code == 429
