"""Hostile calls against Redis mode, with real processes: redis-server, Hypercorn, the fake model.

One client's bad values must never reach the pipelined batches that every socket of the
instance shares (issue #13, item 3), and the model's text must never put unencodable text there
either (item 4).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis
import websockets

from chatbot.fake_openai import reply_chunks, reply_text

from .support.frames import text_of
from .support.procs import ChatbotProcess, FakeOpenAIProcess, RedisClusterProcess, RedisProcess

TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    fake = FakeOpenAIProcess("--ttft-ms", "0", "--chunks", "3", "--interval-ms", "0").start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["redis", "cluster"])
def server(
    request: pytest.FixtureRequest, upstream: FakeOpenAIProcess, redis: RedisProcess
) -> Iterator[ChatbotProcess]:
    url = redis.url if request.param == "redis" else request.getfixturevalue("redis_cluster").url
    env = {"REDIS_URL": url, "OPENAI_BASE_URL": upstream.base_url, "REDIS_TIMEOUT_S": "2"}
    process = ChatbotProcess(env).start()
    yield process
    process.stop()


async def _ready(ws: websockets.ClientConnection) -> dict:
    async with asyncio.timeout(TIMEOUT_S):
        frame = json.loads(await ws.recv())
    assert frame["type"] == "ready", frame
    return frame  # type: ignore[no-any-return]


async def _frames_until_done(ws: websockets.ClientConnection) -> list[dict]:
    frames: list[dict] = []
    async with asyncio.timeout(TIMEOUT_S):
        while not frames or frames[-1]["type"] != "done":
            frames.append(json.loads(await ws.recv()))
    return frames


# Values a client controls, for every id the service takes from outside. A lone surrogate cannot
# be encoded as UTF-8, so no Redis command can carry it; the others are not ids we ever issue.
HOSTILE_IDS = ["\ud800", "a\udfffb", "x" * 5000, "a b", "s:meta", "*", "\x00", "é" * 22, ""]
JSON_HOSTILE = [*HOSTILE_IDS[:-1], 12, ["s"], {"a": 1}, True]
# A message id is the client's own (any printable text of 1-64 characters).
FRAME_HOSTILE = ["\ud800", "a\udfffb", "x" * 65, "\x00", "a\nb", "", 12, ["s"], {"a": 1}]


def _escaped(value: object) -> str:
    return json.dumps(value)  # ensure_ascii: a lone surrogate travels as its \\ud800 escape


async def _hostile_calls(server: ChatbotProcess) -> list[tuple[str, int]]:
    """Every entry point fed every hostile id once; (what, HTTP status or close code)."""
    outcomes: list[tuple[str, int]] = []
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as http:
        for value in JSON_HOSTILE:
            body = '{"message": "hi", "session": ' + _escaped(value) + "}"
            reply = await http.post("/api/ask", content=body, headers=headers)
            outcomes.append((f"ask session={value!r:.20}", reply.status_code))
        for value in ("\ud800", "a\udfffb", 12, ["hi"], None, " "):  # messages, on both routes
            for route in ("/chat", "/api/ask"):
                body = '{"message": ' + _escaped(value) + "}"
                reply = await http.post(route, content=body, headers=headers)
                outcomes.append((f"{route} message={value!r:.20}", reply.status_code))
        for raw in ("%ED%A0%80", "x" * 5000, "a%20b", "s%3Ameta", "%00", "%2A"):
            reply = await http.get(f"/api/tasks/{raw}")
            outcomes.append((f"task {raw:.20}", reply.status_code))
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    ws = await websockets.connect(f"{server.ws_url}?session={raw}")
                await ws.close()
                outcomes.append((f"ws session={raw:.20}", 101))
            except websockets.InvalidStatus as exc:
                outcomes.append((f"ws session={raw:.20}", exc.response.status_code))
        async with asyncio.timeout(TIMEOUT_S):
            async with websockets.connect(server.ws_url) as ws:
                await _ready(ws)
                for value in FRAME_HOSTILE:
                    await ws.send(
                        '{"type": "message", "text": "hi", "id": ' + _escaped(value) + "}"
                    )
                    frame = json.loads(await ws.recv())
                    refused = frame["type"] == "error" and frame["code"] == "invalid_frame"
                    outcomes.append((f"frame id={value!r:.20}", 400 if refused else 0))
    return outcomes


async def test_hostile_ids_on_every_entry_point_never_touch_a_neighbours_reply(
    server: ChatbotProcess,
) -> None:
    async def victim() -> list[dict]:
        async with asyncio.timeout(TIMEOUT_S):
            async with websockets.connect(server.ws_url) as ws:
                await _ready(ws)
                long = "slow [[fake:chunks=60]] [[fake:interval_ms=40]]"
                await ws.send(json.dumps({"type": "message", "id": "v", "text": long}))
                return await _frames_until_done(ws)

    watching = asyncio.create_task(victim())
    outcomes = []
    for _ in range(3):  # for the whole 2.4 s reply
        outcomes += await _hostile_calls(server)
    frames = await watching
    assert text_of(frames) == reply_text("slow", 60)
    assert frames[-1]["reason"] == "stop"
    refused = {what: status for what, status in outcomes if status != 400}
    # An id that is not one of ours is refused at the edge, before any Redis call.
    assert refused == {}, refused
    log = server.output()
    assert "Traceback" not in log and "internal error" not in log


@pytest.mark.parametrize("broker", ["memory", "redis", "cluster"])
async def test_split_surrogate_pairs_from_the_model_arrive_as_unicode(
    request: pytest.FixtureRequest, upstream: FakeOpenAIProcess, redis: RedisProcess, broker: str
) -> None:
    env = {"OPENAI_BASE_URL": upstream.base_url, "REDIS_TIMEOUT_S": "2"}
    if broker == "redis":
        env["REDIS_URL"] = redis.url
    elif broker == "cluster":
        cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
        env["REDIS_URL"] = cluster.url
    process = ChatbotProcess(env).start()
    first, second, third = reply_chunks("emoji", 3)
    expected = first + "\U0001f600" + second + third + "\ufffd"
    try:

        async def neighbour() -> list[dict]:
            async with websockets.connect(process.ws_url) as ws:
                await _ready(ws)
                slow = "slow [[fake:chunks=30]] [[fake:interval_ms=30]]"
                await ws.send(json.dumps({"type": "message", "text": slow}))
                return await _frames_until_done(ws)

        watching = asyncio.create_task(neighbour())
        async with asyncio.timeout(TIMEOUT_S):
            async with websockets.connect(process.ws_url) as ws:
                session = (await _ready(ws))["session"]
                for _ in range(3):  # while the neighbour's reply streams
                    await ws.send(
                        json.dumps({"type": "message", "text": "emoji [[fake:surrogates]]"})
                    )
                    live = await _frames_until_done(ws)
                    assert text_of(live) == expected
                    assert live[-1]["reason"] == "stop"
            # The session is not bricked: a replay of the log sends the same text.
            async with websockets.connect(f"{process.ws_url}?session={session}&after=0") as ws:
                await _ready(ws)
                replayed = [f for _ in range(3) for f in await _frames_until_done(ws)]
            assert text_of(replayed) == 3 * expected
        neighbours = await watching
        assert text_of(neighbours) == reply_text("slow", 30)
        assert "Traceback" not in process.output()
    finally:
        process.stop()


async def test_an_address_over_its_rate_is_refused_before_any_lookup(
    upstream: FakeOpenAIProcess, redis: RedisProcess
) -> None:
    # One Redis only: MONITOR sees one server's commands (the refusal happens before any call,
    # whatever the backend).
    env = {"REDIS_URL": redis.url, "OPENAI_BASE_URL": upstream.base_url, "RATE_LIMIT_IP": "2/hour"}
    process = ChatbotProcess(env).start()
    unknown = "a-session-id-nobody-issued"
    try:
        async with (
            httpx.AsyncClient(base_url=process.url, timeout=TIMEOUT_S) as http,
            aioredis.from_url(redis.url, decode_responses=True) as admin,
        ):
            for _ in range(2):
                assert (await http.post("/api/ask", json={"message": "hi"})).status_code == 202
            async with admin.monitor() as monitor:
                body = {"message": "hi", "session": unknown}
                refused = await http.post("/api/ask", json=body)
                await admin.echo("end of the refused request")
                commands = []
                async with asyncio.timeout(TIMEOUT_S):
                    while "end of the refused" not in (
                        c := (await monitor.next_command())["command"]
                    ):
                        commands.append(c)
        assert refused.status_code == 429
        # Neither a lookup of the session it names nor a rate-limit key made for it.
        assert [c for c in commands if unknown in c] == []
    finally:
        process.stop()
