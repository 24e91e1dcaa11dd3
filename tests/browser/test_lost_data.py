"""The page when Redis loses data: it shows what the server kept, says so, and chats on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from playwright.async_api import Page, expect

from chatbot.fake_openai import reply_text

from ..support.procs import ChatbotProcess, FakeOpenAIProcess, RedisProcess
from .conftest import FAKE_CHUNKS, MODEL, WAIT_MS, expect_reply, messages, open_chat, send, text_of

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture
def redis_and_server(
    fake_openai: FakeOpenAIProcess,
) -> Iterator[tuple[RedisProcess, ChatbotProcess]]:
    redis = RedisProcess().start()  # no AOF: a restart loads the last snapshot (dump.rdb)
    env = {"OPENAI_BASE_URL": fake_openai.base_url, "OPENAI_MODEL": MODEL, "REDIS_URL": redis.url}
    server = ChatbotProcess(env).start()
    yield redis, server
    server.kill()
    redis.stop()


async def test_redis_restored_from_an_older_snapshot_rebuilds_the_page_from_what_it_kept(
    page: Page, redis_and_server: tuple[RedisProcess, ChatbotProcess]
) -> None:
    redis, server = redis_and_server
    await open_chat(page, server.url)
    await send(page, "kept")
    await expect_reply(messages(page, "assistant"), reply_text("kept", FAKE_CHUNKS))
    async with aioredis.from_url(redis.url, socket_timeout=5) as admin:
        await admin.save()
    await send(page, "lost [[fake:chunks=80]] [[fake:interval_ms=50]]")
    lost = messages(page, "assistant").nth(1)
    await expect(text_of(lost)).to_contain_text("word3", timeout=WAIT_MS)

    redis.restart()  # back with the snapshot: the second exchange is gone from the server

    notice = page.get_by_test_id("notice")
    await expect(notice).to_have_text(
        "The server lost part of this conversation; this is what it kept.", timeout=WAIT_MS
    )
    await expect(messages(page, "user")).to_have_count(1, timeout=WAIT_MS)
    await expect(text_of(messages(page, "user"))).to_have_text("kept")
    await expect_reply(messages(page, "assistant"), reply_text("kept", FAKE_CHUNKS))

    await send(page, "and on")  # the conversation goes on from what was kept
    await expect_reply(messages(page, "assistant").nth(1), reply_text("and on", FAKE_CHUNKS))
    await expect(messages(page, "user")).to_have_count(2)
