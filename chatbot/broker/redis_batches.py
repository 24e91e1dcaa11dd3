"""Pipelined batches: the Redis calls of all sockets and replies of a process, one round trip each.

Calls that arrive while a batch is in flight (a token's append, a lease renewal, a history read,
a rate-limit check) go together in the next one: one write of every command, then their replies
read in order. A batch runs on one connection the batcher holds, and its replies are parsed by a
`hiredis.Reader` of its own: redis-py's asyncio pipeline spends ~150 µs of CPU per batch and
~20 µs per command (a pool checkout, tasks, a timeout and an observability record per reply),
which made Redis mode cost +51 % CPU per reply over the in-process broker (docs/benchmarks.md).
The connection itself is made by redis-py's pool (TLS, AUTH, SELECT as the URL says).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError, DataError, NoScriptError, ResponseError

from ..errors import EpochChanged
from ..patches.redis import pack_command, streams
from .redis_epoch import TICK, Epoch

log = logging.getLogger(__name__)

READ_SIZE = 65536
# A batch waits this long for company before it goes. Calls arrive a few per millisecond under
# load, so without it most batches would hold one or two calls, each batch paying a write, a
# read and a loop iteration or two; it adds at most this much to each call's latency.
BATCH_WINDOW_S = 0.002
_NOSCRIPT = "NOSCRIPT "

Call = tuple[Any, bytes]  # (the script, or None for a plain command; the call in the protocol)


def _reply_error(message: str) -> ResponseError:
    if message.startswith(_NOSCRIPT):
        return NoScriptError(message[len(_NOSCRIPT) :])
    return ResponseError(message)


class Batcher:
    """`script()` and `command()` return futures of their replies; a reply that is an error
    (a script that failed, a lost script) is raised to its own caller, a lost connection or a
    timeout to every caller of the batch.

    A call is encoded when it is made, not when its batch goes: one that cannot be (an argument
    that is not bytes, text or a number; text that is not Unicode, such as a lone surrogate)
    fails its own caller at once, as a `DataError`, and never joins a batch. Encoded together,
    it made the whole batch fail: every socket and reply of the process lost its call
    (issue #13)."""

    def __init__(self, pool: ConnectionPool, timeout_s: float, epoch: Epoch | None = None) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        # The dataset's epoch (redis_epoch.py): guarded on each new connection before its first
        # batch, ticked by each batch's last command.
        self._epoch = epoch
        self._tick = b"" if epoch is None else TICK
        self._pending: list[tuple[Call, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None
        self._reader: Any = None  # the connection's hiredis.Reader

    def script(self, script: Any, keys: Sequence[str], args: list[Any]) -> asyncio.Future[Any]:
        """Run `script` (a redis-py `Script`: `EVALSHA` by its sha, loaded again if Redis lost
        it) in the next batch. Calls run in the order made; a reply awaits each of its appends,
        so a session's events keep their order."""
        return self._enqueue(script, ("EVALSHA", script.sha, len(keys), *keys, *args))

    def command(self, *argv: Any) -> asyncio.Future[Any]:
        """A plain command (`HGET`, `LRANGE`, `PUBLISH`...) in the next batch."""
        return self._enqueue(None, argv)

    async def close(self, timeout_s: float) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.wait([self._flusher], timeout=timeout_s)
        await self._drop()

    def _enqueue(self, script: Any, argv: tuple[Any, ...]) -> asyncio.Future[Any]:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            # Packed as they are: the batches make every argv themselves, with no "SCRIPT
            # LOAD"-style command names to split (patches.redis.packed does that for the pool).
            packed = pack_command(argv)
        except (TypeError, UnicodeError) as exc:
            done.set_exception(DataError(f"a Redis call that cannot be encoded: {exc}"))
            return done
        self._pending.append(((script, packed), done))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return done

    async def _flush(self) -> None:
        batch: list[tuple[Call, asyncio.Future[Any]]] = []
        try:
            while self._pending:
                await asyncio.sleep(BATCH_WINDOW_S)
                batch, self._pending = self._pending, []
                try:
                    results = await self._run([call for call, _ in batch])
                except Exception as exc:  # every caller hears of it, as if it ran alone
                    results = [exc] * len(batch)
                for (_, done), result in zip(batch, results, strict=True):
                    if done.done():  # its caller was cancelled
                        continue
                    if isinstance(result, BaseException):
                        done.set_exception(result)
                    else:
                        done.set_result(result)
        finally:
            self._flusher = None
            for _, done in [*batch, *self._pending]:  # closing: nobody waits forever
                if not done.done():
                    done.set_exception(ConnectionError("the broker is closing"))

    async def _run(self, batch: list[Call]) -> list[Any]:
        """The replies of `batch`, in order. When Redis lost a script (a restart) it refuses
        those calls, which therefore did not run: load the scripts and run them again."""
        results = await self._round_trip([packed for _, packed in batch])
        lost = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if lost:
            scripts = list({batch[i][0] for i in lost})
            loads = [pack_command(("SCRIPT", "LOAD", script.script)) for script in scripts]
            retried = await self._round_trip([*loads, *(batch[i][1] for i in lost)])
            for i, result in zip(lost, retried[len(scripts) :], strict=True):
                results[i] = result
        return results

    async def _round_trip(self, packed: list[bytes]) -> list[Any]:
        data = b"".join(packed) + self._tick
        count = len(packed) + (self._epoch is not None)
        # After a Redis restart the held connection is dead, found out only by using it: one
        # immediate retry on a new connection rides that out. (Whether a command ran before its
        # connection died is ambiguous with or without it; appends carry idempotency keys.)
        for attempt in range(2):
            fresh = self._conn is None
            try:
                async with asyncio.timeout(self._timeout_s):
                    conn = await self._connection()
                    replies = await self._exchange(conn, data, count)
                if self._epoch is not None:
                    self._epoch.ticked(replies.pop())
                return replies
            except EpochChanged:
                raise  # nothing of the batch ran; the connection is sound
            except BaseException as exc:
                await self._drop()  # its state is unknown: never reuse it
                if fresh or attempt or not isinstance(exc, (ConnectionError, OSError)):
                    raise
                log.info("redis batch connection lost (%s); reconnecting", exc)
        raise AssertionError("unreachable")

    async def _exchange(self, conn: AbstractConnection, data: bytes, count: int) -> list[Any]:
        reader, writer = streams(conn)
        if reader is None or writer is None:  # disconnected under us: as a lost connection
            raise ConnectionError("the batch connection is closed")
        writer.write(data)
        await writer.drain()
        replies: list[Any] = []
        parse = self._reader
        while len(replies) < count:
            reply = parse.gets()
            if reply is False:  # hiredis: no whole reply buffered yet
                chunk = await reader.read(READ_SIZE)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                parse.feed(chunk)
            else:
                replies.append(reply)
        return replies

    async def _connection(self) -> AbstractConnection:
        if self._conn is None:
            conn = await self._pool.get_connection()
            encoder = conn.encoder
            self._reader = hiredis.Reader(
                replyError=_reply_error,
                encoding=encoder.encoding if encoder.decode_responses else None,
                errors=encoder.encoding_errors,
            )
            self._conn = conn
            if self._epoch is not None:  # a new connection may be to another Redis's data
                (reply,) = await self._exchange(conn, pack_command(self._epoch.guard_argv()), 1)
                if isinstance(reply, Exception):
                    raise reply
                self._epoch.guarded(reply)
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.disconnect()
            finally:
                await self._pool.release(conn)
