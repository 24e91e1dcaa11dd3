"""Commands packed by hiredis are byte for byte what redis-py's own packer sends."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError

from chatbot.patches.redis import use_hiredis_packing

COMMANDS = [
    ("EVALSHA", "a" * 40, 3, "chatbot:s:1:meta", "k2", "k3", '{"t":"délta 🙂"}', 5000, 86400),
    ("SCRIPT LOAD", "return 1"),
    ("HGET", b"raw\x00bytes", memoryview(b"view")),
    ("SET", "k", 1.5, "EX", 10),
]


def _pools() -> tuple[aioredis.ConnectionPool, aioredis.ConnectionPool]:
    plain = aioredis.ConnectionPool.from_url("redis://127.0.0.1:1", decode_responses=True)
    fast = aioredis.ConnectionPool.from_url("redis://127.0.0.1:1", decode_responses=True)
    use_hiredis_packing(fast)
    return plain, fast


def test_packs_as_redis_py_does() -> None:
    plain, fast = _pools()
    reference, hiredis = plain.make_connection(), fast.make_connection()
    assert type(hiredis).__name__ == "HiredisConnection"
    for command in COMMANDS:
        assert b"".join(hiredis.pack_command(*command)) == b"".join(
            bytes(chunk) for chunk in reference.pack_command(*command)
        )
    assert b"".join(hiredis.pack_commands(COMMANDS)) == b"".join(
        bytes(chunk) for chunk in reference.pack_commands(COMMANDS)
    )


def test_a_bad_argument_is_a_data_error() -> None:
    _, fast = _pools()
    with pytest.raises(DataError):
        fast.make_connection().pack_command("SET", "k", object())


def test_applied_once() -> None:
    _, fast = _pools()
    use_hiredis_packing(fast)
    assert fast.connection_class.__mro__[2] is aioredis.Connection
