"""A client that floods its socket with frames is read at WS_FRAMES_PER_S: it costs the instance
what that many frames cost, others chat on unaffected, nothing it sent is dropped, and its
refusals take a few log lines, not one each."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator

import pytest
import websockets

from chatbot.fake_openai import reply_text
from chatbot.routes.websocket import LOGGED_REFUSALS, Pace

from .support.frames import text_of
from .support.procs import ChatbotProcess, FakeOpenAIProcess
from .support.waiting import metric, wait_until

FRAMES_PER_S = 20
FLOOD_S = 4.0
CHUNKS = 5
INVALID_JSON_REFUSED = 'chatbot_refused_frames_total{code="invalid_json"}'
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def server() -> Iterator[ChatbotProcess]:
    upstream = FakeOpenAIProcess(
        "--ttft-ms", "20", "--chunks", str(CHUNKS), "--interval-ms", "20"
    ).start()
    chatbot = ChatbotProcess(
        {
            "OPENAI_BASE_URL": upstream.base_url,
            "OPENAI_API_KEY": "sk-test",
            "WS_FRAMES_PER_S": str(FRAMES_PER_S),
        }
    ).start()
    yield chatbot
    chatbot.stop()
    upstream.stop()


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


async def connect(server: ChatbotProcess) -> tuple[websockets.ClientConnection, dict]:
    async with asyncio.timeout(10):
        ws = await websockets.connect(server.ws_url, close_timeout=1)
        return ws, json.loads(await ws.recv())


async def chat(server: ChatbotProcess, prompts: list[str]) -> list[str]:
    """A well-behaved user: each prompt, its whole reply, then the next."""
    ws, _ = await connect(server)
    texts = []
    try:
        for prompt in prompts:
            await ws.send(json.dumps({"type": "message", "text": prompt}))
            frames = []
            async with asyncio.timeout(15):
                while not frames or frames[-1]["type"] not in ("done", "error"):
                    frames.append(json.loads(await ws.recv()))
            assert frames[-1]["type"] == "done", frames[-1]
            texts.append(text_of(frames))
    finally:
        await ws.close()
    return texts


async def test_a_client_flooding_frames_is_read_at_its_pace_while_others_chat_unaffected(
    server: ChatbotProcess,
) -> None:
    refused_before = await metric(server, INVALID_JSON_REFUSED, absent=0.0)
    paced_before = await metric(server, "chatbot_paced_sockets_total")
    flooder, ready = await connect(server)
    tag = ready["session"][:6]
    answers = 0
    sent = 0

    async def read_answers() -> None:
        nonlocal answers
        async for raw in flooder:
            frame = json.loads(raw)
            assert frame["type"] == "error" and frame["code"] == "invalid_json", frame
            answers += 1

    async def flood() -> None:
        nonlocal sent
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(FLOOD_S):
                while True:  # as fast as the connection takes them
                    await flooder.send("not json")
                    sent += 1

    reader = asyncio.create_task(read_answers())
    cpu_before, started = cpu_s(server.pid), time.monotonic()
    prompts = ["first question", "second question", "third question"]
    _, texts = await asyncio.gather(flood(), chat(server, prompts))
    elapsed = time.monotonic() - started
    spent = cpu_s(server.pid) - cpu_before

    # The other user got every reply whole while the flood went on.
    assert texts == [reply_text(p, CHUNKS) for p in prompts]
    # The flooder was read at its pace: a burst of FRAMES_PER_S, then FRAMES_PER_S a second.
    assert sent > 10 * FLOOD_S * FRAMES_PER_S  # it did send far faster than that

    async def answered() -> bool:
        return answers >= FRAMES_PER_S * FLOOD_S * 0.5

    await wait_until(answered, timeout_s=10)
    assert answers <= FRAMES_PER_S * (elapsed + 1) + 5
    # What it cost the instance: far less than the core an unpaced flood takes (0.9-1.0).
    assert spent < 0.3 * elapsed, (spent, elapsed)

    # Dropped without a close: its refusals so far were logged LOGGED_REFUSALS lines and one
    # line that counts the rest, and the metric has every one.
    flooder.transport.abort()
    reader.cancel()
    # (JSON logs write the "…" after the session's first characters as \u2026)
    summary = re.compile(rf"session {tag}\S*: (\d+) more refused frames not logged one by one")

    async def summed_up() -> bool:
        return summary.search(server.output()) is not None

    await wait_until(summed_up, timeout_s=10)
    output = server.output()
    logged = [line for line in output.splitlines() if tag in line and ": invalid_json: " in line]
    assert len(logged) == LOGGED_REFUSALS
    match = summary.search(output)
    assert match is not None
    unlogged = int(match.group(1))
    refused = await metric(server, INVALID_JSON_REFUSED, absent=0.0)
    assert refused - refused_before == LOGGED_REFUSALS + unlogged
    assert answers <= LOGGED_REFUSALS + unlogged  # some answers were still on their way
    assert len(re.findall(rf"session {tag}\S*: its client sends more than", output)) == 1
    assert await metric(server, "chatbot_paced_sockets_total") == paced_before + 1


async def test_a_burst_past_the_pace_is_answered_in_full_only_later(
    server: ChatbotProcess,
) -> None:
    ws, _ = await connect(server)
    burst = 3 * FRAMES_PER_S
    started = time.monotonic()
    for _ in range(burst):
        await ws.send(json.dumps({"type": "ping"}))
    async with asyncio.timeout(15):
        pongs = [json.loads(await ws.recv()) for _ in range(burst)]
    elapsed = time.monotonic() - started
    await ws.close()
    assert [p["type"] for p in pongs] == ["pong"] * burst  # nothing dropped
    # The first FRAMES_PER_S at once, the rest at FRAMES_PER_S a second.
    assert elapsed >= 0.9 * (burst - FRAMES_PER_S) / FRAMES_PER_S


def test_the_pace_lets_a_burst_through_then_spaces_frames_out() -> None:
    pace = Pace(4.0, now=100.0)
    assert [pace.wait_s(100.0) for _ in range(4)] == [0.0] * 4
    assert pace.wait_s(100.0) == pytest.approx(0.25)
    assert pace.wait_s(100.25) == pytest.approx(0.25)  # read on time: the next a quarter on
    assert pace.wait_s(110.0) == 0.0  # after a quiet spell the burst is back (up to 4)
    unbounded = Pace(0.0, now=0.0)
    assert all(unbounded.wait_s(0.0) == 0.0 for _ in range(1000))
    slow = Pace(0.5, now=0.0)  # under one a second: one at once, then one every 2 s
    assert slow.wait_s(0.0) == 0.0
    assert slow.wait_s(0.0) == pytest.approx(2.0)
