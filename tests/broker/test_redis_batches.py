"""The pipelined batches isolate their callers: one caller's bad call never fails another's."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError, ResponseError

from chatbot.broker.redis_batches import Batcher

from ..support.procs import RedisProcess


async def test_a_call_that_cannot_be_encoded_fails_alone(redis_server: RedisProcess) -> None:
    pool = aioredis.ConnectionPool.from_url(redis_server.url, decode_responses=True)
    batches = Batcher(pool, timeout_s=5)
    failing = aioredis.Redis(connection_pool=pool).register_script("return redis.call('NOPE')")
    try:
        # All made in one tick: they would share one batch.
        calls = [
            batches.command("SET", "batch-test", "ok"),
            batches.command("HGET", "chatbot:s:\ud800:meta", "seq"),  # a lone surrogate
            batches.command("GET", None),  # not a Redis argument at all
            batches.script(failing, [], []),  # fails in Redis, on its own
            batches.command("GET", "batch-test"),
        ]
        async with asyncio.timeout(10):
            results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[0] == "OK"
        assert isinstance(results[1], DataError) and isinstance(results[2], DataError)
        assert isinstance(results[3], ResponseError)
        assert results[4] == "ok"
    finally:
        await batches.close(2)
        await pool.disconnect()


@pytest.mark.parametrize("bad", ["\udfff", "ok\ud83d"])
async def test_a_lone_surrogate_in_a_script_argument_fails_alone(
    redis_server: RedisProcess, bad: str
) -> None:
    pool = aioredis.ConnectionPool.from_url(redis_server.url, decode_responses=True)
    batches = Batcher(pool, timeout_s=5)
    echo = aioredis.Redis(connection_pool=pool).register_script("return ARGV[1]")
    try:
        async with asyncio.timeout(10):
            results = await asyncio.gather(
                batches.script(echo, [], ["before"]),
                batches.script(echo, [], [bad]),
                batches.script(echo, [], ["after"]),
                return_exceptions=True,
            )
        assert results[0] == "before" and results[2] == "after"
        assert isinstance(results[1], DataError)
    finally:
        await batches.close(2)
        await pool.disconnect()
