"""redis-py's asyncio connections: commands packed in C, and a connection's streams.

**Packing.** redis-py's sync connections pack commands with hiredis when it is installed, but
its asyncio connections always use the pure-Python packer (redis/redis-py#4176): ~12 µs per
`EVALSHA` of an event append against ~1.2 µs, and a reply makes about 25 such calls.
`use_hiredis_packing` swaps a pool's connection class for a subclass that packs with
`hiredis.pack_command`, exactly as the sync `HiredisRespSerializer` does.

**Streams.** The broker's batches (chatbot/broker/redis_batches.py) write a whole batch to a
pooled connection's socket and parse the replies with a hiredis reader of their own, skipping
redis-py's per-command machinery; `streams` hands them the connection's asyncio streams, private
attributes that redis-py sets on connect and clears on disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Final

import hiredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    UnixDomainSocketConnection,
)
from redis.exceptions import DataError

from . import changed

# sha256 (first 16 hex digits) of the redis-py 8.1.0 source these rely on: the packers replaced,
# the pool's use of `connection_class`, and where a connection's streams are set and cleared.
FINGERPRINTS: Final = {
    "redis AbstractConnection.pack_command": "9a0e503fdcf56314",
    "redis AbstractConnection.pack_commands": "6a0fb874993fb2e4",
    "redis ConnectionPool.make_connection": "d6f95077e2414e79",
    "redis Connection._connect": "24cd655d5f27ddbb",
    "redis UnixDomainSocketConnection._connect": "c46949736ceeafad",
    "redis AbstractConnection.disconnect": "11194f01c2f6d3c2",
}


def _upstream() -> dict[str, Any]:
    return {
        "redis AbstractConnection.pack_command": AbstractConnection.pack_command,
        "redis AbstractConnection.pack_commands": AbstractConnection.pack_commands,
        "redis ConnectionPool.make_connection": ConnectionPool.make_connection,
        "redis Connection._connect": Connection._connect,
        "redis UnixDomainSocketConnection._connect": UnixDomainSocketConnection._connect,
        "redis AbstractConnection.disconnect": AbstractConnection.disconnect,
    }


def changed_upstream() -> list[str]:
    return changed(FINGERPRINTS, _upstream)


# hiredis's stub declares a one-element tuple and no return type; the C function packs a tuple of
# any length (bytes, text, numbers) into one command's bytes.
pack_command: Final[Callable[[tuple[Any, ...]], bytes]] = hiredis.pack_command


def packed(args: tuple[Any, ...]) -> bytes:
    """One command in the Redis protocol."""
    first = args[0]
    # As redis-py's own packers: "SCRIPT LOAD" and friends go as separate arguments.
    if " " in first if isinstance(first, str) else b" " in first:
        args = (*first.split(), *args[1:])
    try:
        return pack_command(args)
    except TypeError as exc:  # the error redis-py's packer raises for an argument it can't send
        raise DataError(str(exc)) from None


class _HiredisPacking:
    def pack_command(self, *args: Any) -> list[bytes]:
        return [packed(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join([packed(tuple(command)) for command in commands])]


def use_hiredis_packing(pool: ConnectionPool) -> None:
    """Make the connections `pool` creates from now on pack commands with hiredis."""
    base = pool.connection_class
    if issubclass(base, _HiredisPacking):
        return
    pool.connection_class = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})


def streams(
    conn: AbstractConnection,
) -> tuple[asyncio.StreamReader | None, asyncio.StreamWriter | None]:
    """The reader and writer of `conn`'s socket (both None while it is disconnected)."""
    return conn._reader, conn._writer
