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

**ASK on one connection.** Following an ASK redirect (a key of a slot being moved to another
master, already there), redis-py's asyncio cluster client sends `ASKING` to the target node and
then the command, each on the next free connection of the node's pool: with more than one
free, the command goes on another connection than `ASKING`, the target answers MOVED back to the
source, which answers ASK again, until "TTL exhausted" (`ClusterError`; with an even number of
free connections they never meet on one). So calls on moved keys failed while their slot was
being moved. `ask_on_one_connection` sends the two together on one connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any, Final

import hiredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    UnixDomainSocketConnection,
)
from redis.exceptions import DataError

from . import changed

# sha256 (first 16 hex digits) of the redis-py 8.1.0 source these rely on: the packers replaced,
# the pool's use of `connection_class`, where a connection's streams are set and cleared, the
# cluster node's command replaced, and the cluster client's ASK redirect (ASKING to a node, then
# the command to the same node, in one task).
FINGERPRINTS: Final = {
    "redis AbstractConnection.pack_command": "9a0e503fdcf56314",
    "redis AbstractConnection.pack_commands": "6a0fb874993fb2e4",
    "redis ConnectionPool.make_connection": "d6f95077e2414e79",
    "redis Connection._connect": "24cd655d5f27ddbb",
    "redis UnixDomainSocketConnection._connect": "c46949736ceeafad",
    "redis AbstractConnection.disconnect": "11194f01c2f6d3c2",
    "redis ClusterNode.execute_command": "b08935930582fc80",
    "redis RedisCluster._execute_command": "d3b4bf161162bb6d",
}


def _upstream() -> dict[str, Any]:
    return {
        "redis AbstractConnection.pack_command": AbstractConnection.pack_command,
        "redis AbstractConnection.pack_commands": AbstractConnection.pack_commands,
        "redis ConnectionPool.make_connection": ConnectionPool.make_connection,
        "redis Connection._connect": Connection._connect,
        "redis UnixDomainSocketConnection._connect": UnixDomainSocketConnection._connect,
        "redis AbstractConnection.disconnect": AbstractConnection.disconnect,
        "redis ClusterNode.execute_command": _node_execute_command,
        "redis RedisCluster._execute_command": RedisCluster._execute_command,
    }


_node_execute_command: Final = ClusterNode.execute_command


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


# The node that the current task's next command must reach after `ASKING` (RedisCluster sends
# `ASKING` to a node, then, in the same task, the redirected command to that same node).
_asking: ContextVar[ClusterNode | None] = ContextVar("chatbot_asking", default=None)


async def _execute_command(self: ClusterNode, *args: Any, **kwargs: Any) -> Any:
    if args == ("ASKING",):
        _asking.set(self)  # sent with the command it is for, below
        return True
    if _asking.get() is not self:
        return await _node_execute_command(self, *args, **kwargs)
    _asking.set(None)
    kwargs.pop("asking", None)  # HIMPORT's own ASKING: never sent apart, so never here
    connection = self.acquire_connection()
    try:
        await self.disconnect_if_needed(connection)
        await connection.send_packed_command(connection.pack_commands([("ASKING",), args]))
        await connection.read_response()  # ASKING's OK
        return await self.parse_response(connection, args[0], **kwargs)
    finally:
        try:
            await self.disconnect_if_needed(connection)
        finally:
            self.release(connection)


def ask_on_one_connection() -> None:
    """Make redis-py's asyncio cluster client send `ASKING` and the command it redirects on one
    connection (module docstring)."""
    ClusterNode.execute_command = _execute_command  # type: ignore[method-assign]
