"""Abuse limits, access control and upstream failure against real server processes."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import httpx
import pytest
import websockets

from .support.procs import ChatbotProcess, FakeOpenAIProcess, RedisProcess

TOKEN = "a-long-and-random-shared-secret"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    fake = FakeOpenAIProcess("--ttft-ms", "0", "--chunks", "3", "--interval-ms", "0").start()
    yield fake
    fake.stop()


async def chat(url: str, text: str) -> list[dict]:
    """Connect, send one message, return the frames up to `done` or the first error."""
    async with asyncio.timeout(15):
        async with websockets.connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(json.dumps({"type": "message", "text": text}))
            frames = []
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(json.loads(await ws.recv()))
            if frames[-1]["type"] == "error" and "reply_to" in frames[-1]:
                frames.append(json.loads(await ws.recv()))  # a reply error precedes its done
            return frames


def test_message_rate_per_ip_is_shared_by_two_instances(upstream: FakeOpenAIProcess) -> None:
    redis = RedisProcess().start()
    env = {
        "REDIS_URL": redis.url,
        "OPENAI_BASE_URL": upstream.base_url,
        "RATE_LIMIT_IP": "2/minute",
    }
    one, two = ChatbotProcess(env).start(), ChatbotProcess(env).start()
    try:

        async def scenario() -> list[str]:
            outcomes = []
            for server in (one, two, one):
                frames = await chat(server.ws_url, "hello")
                outcomes.append(frames[-1].get("code") or frames[-1]["type"])
            return outcomes

        assert asyncio.run(scenario()) == ["done", "done", "rate_limited"]
        assert "rate_limited" not in two.output()  # refused by instance one, counted on both
    finally:
        for process in (one, two, redis):
            process.stop()


def test_wrong_origin_and_missing_token_are_refused_at_the_handshake(
    upstream: FakeOpenAIProcess,
) -> None:
    server = ChatbotProcess({"OPENAI_BASE_URL": upstream.base_url, "ACCESS_TOKEN": TOKEN}).start()
    try:

        async def scenario() -> None:
            for url, headers, status in (
                (server.ws_url, {}, 401),
                (f"{server.ws_url}?token={TOKEN}", {"Origin": "https://evil.example"}, 403),
            ):
                with pytest.raises(websockets.InvalidStatus) as refused:
                    async with asyncio.timeout(10):
                        await websockets.connect(url, additional_headers=headers)
                assert refused.value.response.status_code == status
            frames = await chat(f"{server.ws_url}?token={TOKEN}", "let me in")
            assert frames[-1]["reason"] == "stop"

        asyncio.run(scenario())
        reply = httpx.post(server.url + "/chat", json={"message": "hi"}, timeout=10)
        assert reply.status_code == 401
    finally:
        server.stop()


def test_an_unreachable_upstream_ends_the_reply_with_a_readable_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env = {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{closed_port}/v1",
        "UPSTREAM_MAX_RETRIES": "0",
    }
    server = ChatbotProcess(env).start()
    try:
        frames = asyncio.run(chat(server.ws_url, "anyone there?"))
        error = next(f for f in frames if f["type"] == "error")
        assert error["code"] == "upstream_unreachable"
        assert frames[-1]["reason"] == "error"
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    finally:
        server.stop()
