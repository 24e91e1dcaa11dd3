"""Observability: Prometheus metrics at /metrics, JSON log lines, and no secret in any of them."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from quart import Quart

from chatbot import logs, metrics
from chatbot.app import create_app
from chatbot.errors import SettingsError
from chatbot.fake_openai import FakeOpenAI
from chatbot.logs import JsonFormatter, TextFormatter
from chatbot.settings import Settings

from .conftest import ready_sockets
from .support.procs import ChatbotProcess, FakeOpenAIProcess, RedisProcess
from .support.waiting import wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

FAMILIES = [
    "chatbot_websockets_open",
    "chatbot_websockets_connected",
    "chatbot_sessions_opened",
    "chatbot_resumes",
    "chatbot_generations_active",
    "chatbot_generations_queued",
    "chatbot_time_to_first_delta_seconds",
    "chatbot_reply_deltas",
    "chatbot_reply_deltas_per_second",
    "chatbot_replies_finished",
    "chatbot_upstream_errors",
    "chatbot_pubsub_canary_lag_seconds",
    "chatbot_rate_limited",
    "chatbot_slow_reader_closes",
    "chatbot_overloaded",
    "chatbot_broker_reconnects",
    "chatbot_gc_pause_seconds",
    "chatbot_gc_pause_max_seconds",
]


async def scrape(app: Quart) -> Samples:
    reply = await app.test_client().get("/metrics")
    assert reply.status_code == 200
    assert reply.content_type.startswith("text/plain")
    return parse((await reply.get_data()).decode())


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


# Metrics, scraped from the app in-process (every test runs once per broker backend).


async def test_every_metric_is_exported_once_however_many_apps_a_process_creates() -> None:
    create_app(Settings())
    create_app(Settings())  # metrics are registered at import, never per app
    families = [f.name for f in text_string_to_metric_families(metrics.scrape().decode())]
    for name in FAMILIES:
        assert families.count(name) == 1, name
    replies = parse(metrics.scrape().decode())
    for reason in ("stop", "length", "cancelled", "error", "interrupted"):
        assert ("chatbot_replies_finished_total", frozenset({("reason", reason)})) in replies


async def test_a_chat_and_a_resume_move_their_metrics(app: Quart, connect) -> None:
    before = await scrape(app)
    async with connect() as (ws, ready):
        assert moved(before, await scrape(app), "chatbot_websockets_open") == 1
        await ws.send({"type": "message", "text": "hello"})
        frames = await ws.until_done()
    assert frames[-1]["reason"] == "stop"
    async with connect(session=ready["session"], after=0) as (again, _):
        await again.until_done()  # the replay
    after = await scrape(app)
    assert moved(before, after, "chatbot_sessions_opened_total") == 1
    assert moved(before, after, "chatbot_websockets_connected_total") == 2
    assert moved(before, after, "chatbot_resumes_total") == 1
    assert moved(before, after, "chatbot_replies_finished_total", reason="stop") == 1
    deltas = [f for f in frames if f["type"] == "delta"]
    assert 1 <= len(deltas) <= 5  # the fake's 5 chunks; chunks that arrive together are one
    assert moved(before, after, "chatbot_reply_deltas_total") == len(deltas)
    assert moved(before, after, "chatbot_time_to_first_delta_seconds_count") == 1
    assert moved(before, after, "chatbot_reply_deltas_per_second_count") == 1
    assert value(after, "chatbot_generations_active") == 0

    async def closed() -> bool:
        return moved(before, await scrape(app), "chatbot_websockets_open") == 0

    await wait_until(closed)


async def test_upstream_errors_and_stops_are_counted(app: Quart, connect) -> None:
    before = await scrape(app)
    async with connect() as (ws, _):
        await ws.send({"type": "message", "text": "fail [[fake:status=500]]"})
        failed = await ws.until_done(timeout_s=30)  # the SDK retries a 500 twice first
        assert failed[-1]["reason"] == "error"
        code = next(f["code"] for f in failed if f["type"] == "error")
        await ws.send(
            {"type": "message", "text": "long [[fake:chunks=500]] [[fake:interval_ms=20]]"}
        )
        await ws.until(lambda f: f["type"] == "delta")
        streaming = await scrape(app)
        await ws.send({"type": "stop"})
        stopped = await ws.until_done()
        assert stopped[-1]["reason"] == "cancelled"
    after = await scrape(app)
    assert value(streaming, "chatbot_generations_active") == 1
    assert moved(before, after, "chatbot_upstream_errors_total", code=code) == 1
    assert (
        total(after, "chatbot_upstream_errors_total")
        - total(before, "chatbot_upstream_errors_total")
        == 1
    )
    assert moved(before, after, "chatbot_replies_finished_total", reason="error") == 1
    assert moved(before, after, "chatbot_replies_finished_total", reason="cancelled") == 1
    assert moved(before, after, "chatbot_replies_finished_total", reason="stop") == 0


async def test_a_failing_post_chat_counts_an_upstream_error(app: Quart) -> None:
    before = await scrape(app)
    reply = await app.test_client().post("/chat", json={"message": "hi [[fake:status=401]]"})
    assert reply.status_code == 502
    after = await scrape(app)
    assert moved(before, after, "chatbot_upstream_errors_total", code="upstream_auth") == 1


async def test_the_queue_and_overload_refusals_are_visible(
    app_with, settings: Settings, fake: FakeOpenAI
) -> None:
    fake.configure(chunks=400, interval_ms=20)
    async with app_with(settings.replace(max_generations=1, max_queued_replies=1)) as app:
        before = await scrape(app)
        async with ready_sockets(app, 3) as (a, b, c):
            await a.send({"type": "message", "text": "first"})
            await a.until(lambda f: f["type"] == "delta")
            await b.send({"type": "message", "text": "second"})
            await b.until(lambda f: f["type"] == "queued")
            await c.send({"type": "message", "id": "third", "text": "third"})
            assert (await c.recv())["code"] == "overloaded"
            during = await scrape(app)
            for ws in (a, b):
                await ws.send({"type": "stop"})
                await ws.until_done()
        after = await scrape(app)
    assert value(during, "chatbot_generations_active") == 1
    assert value(during, "chatbot_generations_queued") == 1
    assert moved(before, after, "chatbot_overloaded_total") == 1
    assert value(after, "chatbot_generations_queued") == 0


async def test_the_redis_canary_round_trip_is_measured(
    app_with, redis_url: str, fake: FakeOpenAI
) -> None:
    settings = Settings(
        openai_base_url=fake.base_url, redis_url=redis_url, redis_canary_interval_s=0.05
    )
    async with app_with(settings) as app:
        before = await scrape(app)

        async def measured() -> bool:
            after = await scrape(app)
            return moved(before, after, "chatbot_pubsub_canary_lag_seconds_count") >= 2

        await wait_until(measured)
        after = await scrape(app)
    lag = moved(before, after, "chatbot_pubsub_canary_lag_seconds_sum")
    assert 0 <= lag < 5


def test_collector_pauses_are_timed_by_generation() -> None:
    """`chatbot serve` times every collection once started: the pause histogram and the worst
    pause, on the wall clock and in CPU, per generation."""
    before = parse(metrics.scrape().decode())
    metrics.time_gc()
    metrics.time_gc()  # once is enough: a second call adds no second timer
    try:
        garbage = [[n] for n in range(10_000)]
        for item in garbage:
            item.append(item)  # cycles only the collector frees
        del garbage, item
        gc.collect(0)
        gc.collect(2)
    finally:
        gc.callbacks.remove(metrics._gc_timer)
    assert metrics._gc_timer not in gc.callbacks
    after = parse(metrics.scrape().decode())
    for generation in ("0", "2"):
        assert moved(before, after, "chatbot_gc_pause_seconds_count", generation=generation) >= 1
        assert moved(before, after, "chatbot_gc_pause_seconds_sum", generation=generation) > 0
        for clock in ("wall", "cpu"):
            labels = {"generation": generation, "clock": clock}
            assert value(after, "chatbot_gc_pause_max_seconds", **labels) > 0


def test_rate_limit_refusals_are_counted_by_scope() -> None:
    before = parse(metrics.scrape().decode())
    metrics.rate_limited("observability_test")
    after = parse(metrics.scrape().decode())
    assert moved(before, after, "chatbot_rate_limited_total", scope="observability_test") == 1


# Logs.


def _record(message: str = "hello %s", *args: object, **extra: Any) -> logging.LogRecord:
    record = logging.getLogger("chatbot.test").makeRecord(
        "chatbot.test", logging.WARNING, __file__, 1, message, args or ("world",), None
    )
    record.__dict__.update(extra)
    return record


def test_a_json_line_has_the_fields_a_truncated_session_and_the_request_id() -> None:
    session = "abcdefghijklmnopqrstuvwx"

    def log_in_a_request() -> str:
        logs.bind_request("req-1234")
        logs.bind_session(session)
        try:
            raise ValueError("boom")
        except ValueError:
            record = _record()
            record.exc_info = sys.exc_info()
        return JsonFormatter().format(record)

    line = contextvars.copy_context().run(log_in_a_request)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "chatbot.test"
    assert entry["message"] == "hello world"
    assert entry["session"] == "abcdef…"
    assert entry["request_id"] == "req-1234"
    assert "ValueError: boom" in entry["exception"]
    assert entry["time"].endswith("Z")
    assert datetime.fromisoformat(entry["time"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert session not in line


def test_correlation_fields_come_from_extra_and_are_left_out_when_unset() -> None:
    entry = json.loads(
        contextvars.copy_context().run(JsonFormatter().format, _record(session="0123456789abc"))
    )
    assert entry["session"] == "012345…"
    assert "request_id" not in entry
    assert "exception" not in entry


def test_secrets_are_redacted_from_every_format() -> None:
    settings = Settings(
        openai_api_key="sk-secret-xyz",
        redis_url="rediss://:p%40ss-word@redis.example:6380/0",
        openai_base_url="http://user:base-pw@llm.example/v1",
    )
    hidden = logs.secret_values(settings)
    assert set(hidden) == {"sk-secret-xyz", "p%40ss-word", "p@ss-word", "base-pw"}
    record = _record("key %s url %s", "sk-secret-xyz", "rediss://:p@ss-word@h")
    for formatter in (JsonFormatter(secrets=hidden), TextFormatter(secrets=hidden)):
        line = formatter.format(record)
        assert "sk-secret-xyz" not in line and "ss-word" not in line
        assert logs.REDACTED in line


def test_the_text_format_is_one_readable_line() -> None:
    line = contextvars.copy_context().run(
        TextFormatter().format, _record(session="0123456789abc", request_id="r1")
    )
    assert line.endswith("WARNING chatbot.test [012345… r1]: hello world")


def test_a_callers_request_id_is_kept_only_when_it_looks_like_one() -> None:
    def bind(header: str | None) -> str:
        return contextvars.copy_context().run(logs.bind_request, header)

    assert bind("f0e1d2c3-b4a5-4697-8899-aabbccddeeff") == "f0e1d2c3-b4a5-4697-8899-aabbccddeeff"
    for hostile in (None, "", "two words", "x\ny", "x" * 200):
        made = bind(hostile)
        assert made != hostile and len(made) == 16


async def test_http_replies_carry_the_request_id(app: Quart) -> None:
    client = app.test_client()
    echoed = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    made = await client.get("/healthz")
    assert len(made.headers["X-Request-ID"]) == 16


@pytest.mark.parametrize(("raw", "expected"), [(None, "json"), ("text", "text"), ("JSON", "json")])
def test_log_format_setting(raw: str | None, expected: str) -> None:
    environ = {} if raw is None else {"LOG_FORMAT": raw}
    assert Settings.from_env(environ).log_format == expected


def test_a_bad_log_format_names_the_variable() -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"LOG_FORMAT": "xml"})
    assert error.value.variable == "LOG_FORMAT"


def test_a_bad_url_is_quoted_without_its_password() -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"REDIS_URL": "redis:/:hunter2@cache.example:6379"})
    assert error.value.variable == "REDIS_URL"
    assert "hunter2" not in str(error.value)
    assert "***@cache.example:6379" in str(error.value)


# A real server process: every line of its output is JSON, and no line holds a secret.

API_KEY = "sk-secret-xyz"
REDIS_PASSWORD = "redis-secret-pw"


@pytest.fixture
def stack() -> Iterator[tuple[ChatbotProcess, RedisProcess]]:
    redis = RedisProcess()
    redis.argv += ["--requirepass", REDIS_PASSWORD]
    redis.start()
    fake = FakeOpenAIProcess("--ttft-ms", "0", "--chunks", "3", "--interval-ms", "1").start()
    env = {
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_BASE_URL": fake.base_url,
        "REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",  # the most any library will say
    }
    server = ChatbotProcess(env)
    try:
        yield server.start(), redis
    finally:
        server.stop()
        fake.stop()
        redis.stop()


async def _chat(ws: websockets.ClientConnection, text: str) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "message", "text": text}))
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while not frames or frames[-1]["type"] != "done":
            frames.append(json.loads(await ws.recv()))
    return frames


async def test_a_real_server_logs_only_json_lines_and_never_a_secret(
    stack: tuple[ChatbotProcess, RedisProcess],
) -> None:
    server, redis = stack
    async with asyncio.timeout(10):
        ws = await websockets.connect(server.ws_url, additional_headers={"X-Request-ID": "rq-77"})
        session = json.loads(await ws.recv())["session"]
    assert (await _chat(ws, "hello"))[-1]["reason"] == "stop"
    refused = await _chat(ws, "who am I [[fake:status=401]]")
    assert [f["code"] for f in refused if f["type"] == "error"] == ["upstream_auth"]
    async with asyncio.timeout(10):
        await ws.close()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert (await client.post("/chat", json={"message": "x [[fake:status=401]]"})).is_error
        scraped = (await client.get("/metrics")).text
    assert value(parse(scraped), "chatbot_upstream_errors_total", code="upstream_auth") == 2
    redis.kill()  # errors, reconnect attempts: where a URL with its password could slip out

    async def complained() -> bool:
        return "listener down" in server.output()

    await wait_until(complained, timeout_s=15)
    assert await asyncio.to_thread(server.terminate) == 0
    output = server.output()
    assert API_KEY not in output and API_KEY not in scraped
    assert REDIS_PASSWORD not in output
    assert session not in output  # a session id is a credential: logs show 6 characters
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(e["logger"] == "hypercorn.error" for e in entries)
    failed = [e for e in entries if "failed upstream: upstream_auth" in e["message"]]
    assert failed and all(e["request_id"] for e in failed)
    socket_lines = [e for e in failed if e.get("request_id") == "rq-77"]
    assert socket_lines and socket_lines[0]["session"] == session[:6] + "…"
    assert all(e.get("instance") for e in failed)
