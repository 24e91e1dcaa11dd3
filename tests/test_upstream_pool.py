"""Upstream connections are reused: N replies, sequential or concurrent, over http and https,
open no more connections than replies run at once.

Real OpenAI-compatible servers (LiteLLM's proxy, llama.cpp's server) write `[DONE]` and the
chunked body's terminator apart; the fake does the same with `end_apart_ms`. A client that lets
go of the response at `[DONE]` closes the connection then, and the next reply pays a TCP and
TLS handshake. The https upstream serves a throwaway self-signed certificate, trusted the way
the README tells operators to: `SSL_CERT_FILE`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatbot.fake_openai import FakeOpenAI, reply_text, self_signed_certificate, tls_context
from chatbot.llm import open_model
from chatbot.llm.openai import OpenAIProvider
from chatbot.llm.resilient import ResilientModel
from chatbot.runtime import runtime_of
from chatbot.settings import Settings

from .conftest import API_KEY, AppFactory, ready_sockets, text_of
from .support.procs import require_executable
from .support.waiting import wait_until

N = 6
ROUNDS = 3
APART_MS = 30  # the terminator's delay after [DONE]: far longer than a loopback read


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    require_executable("openssl", package="openssl")
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=["http-apart", "https-apart", "https-together"])
async def upstream(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FakeOpenAI]:
    scheme, framing = request.param.split("-")
    tls = None
    if scheme == "https":
        cert, key = request.getfixturevalue("certificate")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        tls = tls_context(cert, key)
    async with FakeOpenAI(ttft_ms=0, chunks=5, interval_ms=5, tls=tls) as server:
        if framing == "apart":
            server.configure(end_apart_ms=APART_MS)
        yield server


def settings_for(fake: FakeOpenAI) -> Settings:
    return Settings(openai_base_url=fake.base_url, openai_api_key=API_KEY, openai_model="m")


def finishing(model: ResilientModel) -> int:
    """The OpenAI provider's finished replies whose connection waits for its body's end."""
    assert isinstance(model.provider, OpenAIProvider)
    return model.provider.finishing


async def settled(model: ResilientModel) -> None:
    """Until every finished reply's connection is pooled: a user's next message comes well
    after the body's end, which is milliseconds behind [DONE]."""

    async def check() -> bool:
        return finishing(model) == 0

    await wait_until(check, timeout_s=10)


async def one_reply(model: ResilientModel, prompt: str) -> str:
    async with asyncio.timeout(10), model.stream([{"role": "user", "content": prompt}]) as r:
        return "".join([piece async for piece in r])


async def test_sequential_replies_ride_one_connection(upstream: FakeOpenAI) -> None:
    model = open_model(settings_for(upstream))
    try:
        for k in range(N):
            assert await one_reply(model, f"q{k}") == reply_text(f"q{k}", 5)
            await settled(model)
        assert [r["status"] for r in upstream.requests] == ["completed"] * N
        assert upstream.connections_accepted == 1
    finally:
        await model.close()


async def test_concurrent_replies_open_one_connection_each_once(upstream: FakeOpenAI) -> None:
    model = open_model(settings_for(upstream))
    try:
        for round_ in range(ROUNDS):
            prompts = [f"r{round_}q{k}" for k in range(N)]
            texts = await asyncio.gather(*(one_reply(model, p) for p in prompts))
            assert texts == [reply_text(p, 5) for p in prompts]
            await settled(model)
        assert len(upstream.requests) == N * ROUNDS
        assert upstream.connections_accepted <= N
    finally:
        await model.close()


async def test_a_body_that_never_ends_is_closed_not_pooled(upstream: FakeOpenAI) -> None:
    """The wait for the body's end is bounded: the connection is closed after it, and the next
    reply opens a new one."""
    upstream.configure(end_apart_ms=60_000)
    model = open_model(settings_for(upstream))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("chatbot.llm.openai.BODY_END_WAIT_S", 0.2)
            assert await one_reply(model, "a") == reply_text("a", 5)
            assert finishing(model) == 1
            await settled(model)
        record = await upstream.wait_request(1, ended=True, timeout_s=10)
        assert record["status"] == "aborted"  # the client hung up
        assert await one_reply(model, "b") == reply_text("b", 5)
        assert upstream.connections_accepted == 2
    finally:
        await model.close()


async def test_an_upstream_that_closes_its_connections_costs_one_per_reply(
    upstream: FakeOpenAI,
) -> None:
    """The cold pool `bench.run` compares against: `Connection: close` from the server."""
    upstream.configure(close=True)
    model = open_model(settings_for(upstream))
    try:
        for k in range(3):
            assert await one_reply(model, f"c{k}") == reply_text(f"c{k}", 5)
            await settled(model)
        assert upstream.connections_accepted == 3
    finally:
        await model.close()


async def test_a_chat_over_https_reuses_its_connection(
    app_with: AppFactory, upstream: FakeOpenAI
) -> None:
    """Through the app: a user's replies, each whole and in order, over one connection."""
    async with app_with(settings_for(upstream)) as app, ready_sockets(app, 1) as (ws,):
        model = runtime_of(app.app).service.model
        for k in range(N):
            await ws.send({"type": "message", "id": f"m{k}", "text": f"hello {k}"})
            frames = await ws.until_done(10)
            assert frames[-1]["reason"] == "stop"
            assert text_of(frames) == reply_text(f"hello {k}", 5)
            await settled(model)
    assert upstream.connections_accepted == 1
