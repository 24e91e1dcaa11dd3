"""Command packing in C for redis-py's asyncio connections.

redis-py's sync connections pack commands with hiredis when it is installed, but its asyncio
connections always use the pure-Python packer (redis/redis-py#4176): ~12 µs per `EVALSHA` of an
event append against ~1.2 µs, and a reply makes about 25 such calls. `use_hiredis_packing`
swaps a pool's connection class for a subclass that packs with `hiredis.pack_command`, exactly as
the sync `HiredisRespSerializer` does. Without hiredis the pool is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

import hiredis
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import DataError

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
