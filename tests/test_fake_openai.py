"""The fake OpenAI server, driven through the real `openai` client over real HTTP."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from chatbot.fake_openai import FakeOpenAI, parse_prompt, reply_chunks, reply_text

from .support.procs import require_executable

XSS = "<script>alert('x')</script> & \"quotes\" \u00e9\u6f22"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with asyncio.timeout(5), FakeOpenAI(ttft_ms=5, chunks=4, interval_ms=2) as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=fake.base_url, api_key="sk-test", max_retries=0, timeout=5
    ) as c:
        yield c


@pytest.fixture
async def control(fake: FakeOpenAI) -> AsyncIterator[httpx.AsyncClient]:
    base = fake.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(base_url=base, timeout=5) as c:
        yield c


def user(content: str) -> list[Any]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]


async def stream_chat(client: openai.AsyncOpenAI, content: str, **kw: Any) -> list[Any]:
    async with asyncio.timeout(5):
        stream = await client.chat.completions.create(
            model="gpt-test", messages=user(content), stream=True, **kw
        )
        return [chunk async for chunk in stream]


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_reply_chunks_echo_the_prompt_verbatim_in_exactly_n_pieces() -> None:
    assert reply_chunks(XSS, 3) == [f"You said: {XSS}\n", "word1 ", "word2 "]
    assert reply_chunks("x", 1) == ["You said: x\n"]
    assert reply_text("x", 2) == "You said: x\nword1 "
    assert parse_prompt("hi [[fake:chunks=3]] [[fake:hang]]") == (
        "hi",
        {"chunks": "3", "hang": None},
    )
    assert parse_prompt("  as is  ") == ("  as is  ", {})
    with pytest.raises(ValueError):
        reply_chunks("x", 0)


async def test_split_streams_the_echo_in_pieces_of_n_characters(
    client: openai.AsyncOpenAI,
) -> None:
    prompt = "| a | b |\n|---|---|\n| 1 | 2 |"
    assert reply_chunks("abcdefg", 2, split=4) == ["You ", "said", ": ab", "cdef", "g\n", "word1 "]
    chunks = await stream_chat(client, f"{prompt} [[fake:split=3]] [[fake:chunks=1]]")
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == reply_text(prompt, 1) and {len(p) for p in pieces[:-1]} == {3}
    assert len(pieces) == -(-len(reply_text(prompt, 1)) // 3)


async def test_stream_matches_the_openai_wire_format(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    chunks = await stream_chat(client, XSS)

    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 5 + ["stop"]
    assert text_of(chunks) == reply_text(XSS, 4)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "gpt-test"
    record = await fake.wait_request(1, ended=True, timeout_s=2)
    assert record["status"] == "completed" and record["stream"] is True
    assert record["chunks_sent"] == 4 and record["text_sent"] == reply_text(XSS, 4)
    assert record["authorization"] is True and "sk-test" not in repr(record)


async def test_directives_override_defaults_and_are_not_echoed(client: openai.AsyncOpenAI) -> None:
    chunks = await stream_chat(client, "hello [[fake:chunks=7]][[fake:interval_ms=0]]")
    assert text_of(chunks) == reply_text("hello", 7)


async def test_non_streaming_completion(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    async with asyncio.timeout(5):
        reply = await client.chat.completions.create(model="gpt-test", messages=user("hi"))

    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == reply_text("hi", 4)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 4
    assert fake.requests[0]["status"] == "completed" and fake.requests[0]["stream"] is False


async def test_max_tokens_ends_with_finish_reason_length(client: openai.AsyncOpenAI) -> None:
    chunks = await stream_chat(client, "hi", max_completion_tokens=2)
    assert text_of(chunks) == "".join(reply_chunks("hi", 4)[:2])
    assert chunks[-1].choices[0].finish_reason == "length"

    async with asyncio.timeout(5):
        reply = await client.chat.completions.create(
            model="gpt-test", messages=user("hi"), max_tokens=3
        )
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "".join(reply_chunks("hi", 4)[:3])


async def test_include_usage_adds_a_usage_chunk_without_choices(client: openai.AsyncOpenAI) -> None:
    chunks = await stream_chat(client, "hi", stream_options={"include_usage": True})
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_status_429_is_a_rate_limit_error_with_retry_after(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await stream_chat(client, "hi [[fake:status=429]] [[fake:retry_after=7]]")
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"
    assert fake.requests[0]["status"] == "error_response"


async def test_status_500_is_an_internal_server_error(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        async with asyncio.timeout(5):
            await client.chat.completions.create(
                model="gpt-test", messages=user("[[fake:status=500]]")
            )


async def test_wrong_api_key_is_an_authentication_error() -> None:
    async with asyncio.timeout(5), FakeOpenAI(api_key="sk-right") as fake:
        async with openai.AsyncOpenAI(
            base_url=fake.base_url, api_key="sk-wrong", max_retries=0, timeout=5
        ) as client:
            with pytest.raises(openai.AuthenticationError) as caught:
                await stream_chat(client, "hi")
        assert caught.value.code == "invalid_api_key"
        assert fake.requests[0]["authorization"] is True
        assert "sk-wrong" not in repr(fake.requests)


async def test_bad_directive_is_a_bad_request(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="chunks"):
        await stream_chat(client, "[[fake:chunks=zero]]")


async def test_cut_drops_the_connection_after_n_chunks(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async with asyncio.timeout(5):
            stream = await client.chat.completions.create(
                model="gpt-test", messages=user("hi [[fake:cut=3]]"), stream=True
            )
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
    assert received == ["", *reply_chunks("hi", 4)[:3]]
    assert fake.requests[0]["status"] == "failed"


async def test_malformed_event_breaks_the_client_parser(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(ValueError):  # json.JSONDecodeError
        await stream_chat(client, "[[fake:malformed=1]]")


async def test_closing_the_client_stream_aborts_the_upstream_request_promptly(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    async with asyncio.timeout(5):
        stream = await client.chat.completions.create(
            model="gpt-test", messages=user("[[fake:interval_ms=5000]]"), stream=True
        )
        seen = [await anext(aiter(stream)) for _ in range(2)]  # role chunk + first content
        assert seen[1].choices[0].delta.content == reply_chunks("", 4)[0]
        # The fake now sleeps 5 s before the next chunk, so only its socket reader can notice.
        closed_at = time.monotonic()
        await stream.close()
    record = await fake.wait_request(1, ended=True, timeout_s=2)
    assert record["status"] == "aborted" and record["chunks_sent"] == 1
    assert time.monotonic() - closed_at < 0.5


async def test_hang_holds_the_request_until_the_client_gives_up(fake: FakeOpenAI) -> None:
    async with openai.AsyncOpenAI(
        base_url=fake.base_url, api_key="sk-test", max_retries=0, timeout=0.3
    ) as client:
        with pytest.raises(openai.APITimeoutError):
            await stream_chat(client, "[[fake:hang]]")
    record = await fake.wait_request(1, ended=True, timeout_s=2)
    assert record["status"] == "aborted" and record["chunks_sent"] == 0


async def test_close_aborts_streams_that_hang_after_n_chunks() -> None:
    fake = FakeOpenAI(ttft_ms=0, chunks=4, interval_ms=0)
    async with asyncio.timeout(5), fake:
        async with openai.AsyncOpenAI(
            base_url=fake.base_url, api_key="sk-test", max_retries=0, timeout=5
        ) as client:
            stream = await client.chat.completions.create(
                model="gpt-test", messages=user("[[fake:hang_after=2]]"), stream=True
            )
            received = [await anext(aiter(stream)) for _ in range(3)]  # role + 2 content chunks
            await fake.close()
            with pytest.raises(openai.APIConnectionError):
                await anext(aiter(stream))
    assert text_of(received) == "".join(reply_chunks("", 4)[:2])
    assert fake.requests[0]["status"] == "aborted" and fake.requests[0]["chunks_sent"] == 2


async def test_keep_alive_serves_sequential_requests_on_one_connection(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    first = await stream_chat(client, "one")
    async with asyncio.timeout(5):
        second = await client.chat.completions.create(model="gpt-test", messages=user("two"))
    third = await stream_chat(client, "three")

    assert text_of(first) == reply_text("one", 4)
    assert second.choices[0].message.content == reply_text("two", 4)
    assert text_of(third) == reply_text("three", 4)
    assert [r["id"] for r in fake.requests] == [1, 2, 3]
    assert fake.connections_accepted == 1


async def test_control_endpoints_long_poll_configure_and_reset(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, control: httpx.AsyncClient
) -> None:
    async with asyncio.timeout(5):
        waiting = asyncio.create_task(control.get("/_fake/requests/1?wait=ended&timeout_s=3"))
        config = await control.post("/_fake/config", json={"chunks": 2, "interval_ms": 0})
        assert config.json()["chunks"] == 2
        await stream_chat(client, "hi")
        ended = await waiting
        assert ended.status_code == 200
        assert ended.json()["status"] == "completed"
        assert ended.json()["text_sent"] == reply_text("hi", 2)

        listed = await control.get("/_fake/requests")
        assert [r["id"] for r in listed.json()] == [1]
        stats = (await control.get("/_fake/stats")).json()
        assert stats == {"connections_accepted": fake.connections_accepted, "requests": 1}
        missing = await control.get("/_fake/requests/2?wait=exists&timeout_s=0.05")
        assert missing.status_code == 408 and "error" in missing.json()
        assert (await control.post("/_fake/config", json={"cut": "x"})).status_code == 400
        restored = await control.post("/_fake/config", json={"reset": True})
        assert restored.json()["chunks"] == 4

        await control.post("/_fake/config", json={"chunks": 9})
        assert (await control.post("/_fake/reset")).status_code == 200
        assert fake.requests == [] and fake.config.chunks == 4
        await stream_chat(client, "again")
        assert (await fake.wait_request(1, ended=True))["text_sent"] == reply_text("again", 4)

        unknown = await control.get("/v1/embeddings")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "unknown_url"


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_command_line_prints_its_url_and_exits_cleanly_on_sigterm(
    tls: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --tls it serves https with a throwaway certificate, which a client trusts through
    SSL_CERT_FILE as the line says, and which is gone when the server exits."""
    if tls:
        require_executable("openssl", package="openssl")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatbot.fake_openai", "--port", "0",
        "--ttft-ms", "0", "--chunks", "3", "--interval-ms", "0", *(["--tls"] if tls else []),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(10):
            line = (await process.stdout.readline()).decode()  # type: ignore[union-attr]
            prefix = "fake-openai listening on "
            url, _, trust = line.removeprefix(prefix).strip().partition(" ")
            assert line.startswith(prefix) and url.endswith("/v1")
            assert url.startswith("https://" if tls else "http://")
            cert = trust.removeprefix("(trust it with SSL_CERT_FILE=").removesuffix(")")
            if tls:
                assert "BEGIN CERTIFICATE" in await asyncio.to_thread(Path(cert).read_text)
                monkeypatch.setenv("SSL_CERT_FILE", cert)
            async with openai.AsyncOpenAI(
                base_url=url, api_key="k", max_retries=0, timeout=5
            ) as client:
                assert text_of(await stream_chat(client, "sub")) == reply_text("sub", 3)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            assert not (tls and await asyncio.to_thread(Path(cert).exists))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
