"""The Redis broker: shared sessions, a replayable event log, leases and fan-out between instances.

Connection budget per process: one pub/sub connection (whatever the number of sockets: the local
fan-out passes each event on to them), one for the pipelined batches and a few for replays
(`REDIS_MAX_CONNECTIONS` in all, from one blocking pool).

Fan-out: an instance delivers the events it writes to its own sockets at once, and Redis
publishes them only to the *other* instances that have sockets on the session (its `subs` set),
on each one's event channel. The common case, a reply whose sockets are all on the instance that
generates it, then costs no pub/sub traffic at all.

Key layout (docs/scaling.md has the full story):

    chatbot:s:{session}:meta   hash   seq (last seq), the last append's and turn's operation keys
    chatbot:s:{session}:log    stream entry id "{seq}-0", field f = the frame; MAXLEN ~ N
    chatbot:s:{session}:hist   list   model context turns (JSON), trimmed to 2 x HISTORY_TURNS
    chatbot:s:{session}:subs   set    instances with local sockets on the session
    chatbot:lease              hash   session -> "owner|msg_id|token" of the generating instance
    chatbot:lease:due          zset   session -> lease deadline (ms, Redis clock)
    chatbot:instances          zset   instance -> alive until (ms, Redis clock), kept by its keeper
    chatbot:secret             string the secret that signs ids of sessions not stored yet
    {counter key}              hash   instance -> "version:count": its share of a shared counter
    chatbot:task:{task}        string the HTTP ask API's task record (JSON), with a TTL
    chatbot:epoch              hash   id, clock: the dataset's epoch (redis_epoch.py)
    channel chatbot:e:{instance}      live events for one instance: "{session} {frame}"
    channel chatbot:i:{instance}      control messages for one instance (stop, canary)

A session's keys never exist without a TTL of SESSION_TTL_S: the script that can make each one
sets it (creating the session: meta; its first event: log, and the other three; a history turn:
hist, and meta, whose `turn` it writes; a join: subs). An event refreshes all four together, but
only once the log's TTL has run down by a second (`_append_one`), so a session lives
SESSION_TTL_S after its last event, less at most a second (`expiry_slack_s`).

Every multi-step change is one Lua script, so seq order, log order and publish order agree, and
clocks of different machines never matter (leases use Redis's TIME). Every change may run twice:
a call whose answer was lost (a stall longer than REDIS_TIMEOUT_S, a dropped connection) is sent
again by the batcher or retried by its caller while the first copy may still run. So each one is
idempotent: appends and history turns carry an operation key, acquiring checks for its own lease,
and shared counters are written as this instance's absolute, versioned share.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

import redis.asyncio as aioredis
from limits.aio.storage import RedisStorage
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from .. import metrics
from ..errors import BrokerUnavailable, EpochChanged, SessionExpired
from ..llm.base import Message
from ..patches.limits import batch_sliding_window_scripts
from ..patches.redis import use_hiredis_packing
from ..protocol import encode, new_id
from ..settings import Settings
from .base import (
    GONE,
    NEW_EPOCH,
    RESYNC,
    Broker,
    BrokerStats,
    ControlHandler,
    Event,
    Lease,
    LocalFanOut,
    cancelling,
    take_page,
)
from .redis_batches import Batcher
from .redis_epoch import KEY as EPOCH_KEY
from .redis_epoch import Epoch

log = logging.getLogger(__name__)

PREFIX: Final = "chatbot"
LEASES: Final = f"{PREFIX}:lease"
LEASE_DUE: Final = f"{PREFIX}:lease:due"
INSTANCES: Final = f"{PREFIX}:instances"
SECRET: Final = f"{PREFIX}:secret"
REPLAY_BATCH: Final = 100  # log entries per XRANGE of a paged replay
CLOSE_TIMEOUT_S: Final = 2.0
RECONNECT_BACKOFF_S: Final = (0.1, 2.0)  # first and longest wait between listener restarts


def _fan_out(
    subs: str,
    frame: str,
    writer: str,
    session: str,
    *,
    publish: str = "PUBLISH",
    channel: str = f"'{PREFIX}:e:' .. instance",
) -> str:
    """Lua publishing `frame` to the event channel of every instance in the session's set `subs`
    but `writer`, which delivers to its own sockets itself (the arguments are Lua expressions;
    `channel` names an instance's channel from `instance`, and `publish` sends to it)."""
    return f"""
for _, instance in ipairs(redis.call('SMEMBERS', {subs})) do
  if instance ~= {writer} then
    redis.call('{publish}', {channel}, {session} .. ' ' .. {frame})
  end
end
"""


# Appends one event: next seq, log entry, TTL refresh, fan-out; 0, appending nothing, when the
# session does not exist (it expired, or Redis lost it: recreated, it would reuse seqs). The TTLs
# of the session's four keys are refreshed together only once the log's has run down by a second
# (half a TTL, if shorter: `expiry_slack_s`): 4 EXPIREs on every event were a quarter of Redis's
# calls. The log's PTTL is -2 when this XADD makes it, so that event sets every TTL. Only this
# refresh sets the log's TTL: a log that lost less than a second means every key that existed
# then still has at least SESSION_TTL_S - 1 s, and keys made since (history, subs) got theirs
# from the scripts that made them. ARGV[1] and ARGV[2] are the frame's JSON before and after the
# seq value, so the frame is built without decoding JSON in Lua. ARGV[5] is the event's
# idempotency key ('' for none): the same key as the last append returns that append's seq and
# does nothing (a retry of a call whose answer was lost). The last key is the epoch's hash and the
# last argument the highest clock the writer saw: a lower clock means Redis went back to older
# data under a connection that stayed open (redis_epoch.py), and the script returns -1, appending
# nothing.
_CURRENT = """
if tonumber(redis.call('HGET', KEYS[#KEYS], 'clock') or 0) < tonumber(ARGV[#ARGV]) then
  return -1
end
"""


def _append_one(**fan_out: str) -> str:
    """The Lua of one append (see `_APPEND`), publishing with `_fan_out(**fan_out)`."""
    return (
        """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'key') == ARGV[5] then
  return tonumber(redis.call('HGET', KEYS[1], 'seq'))
end
redis.call('HSET', KEYS[1], 'key', ARGV[5])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local frame = ARGV[1] .. seq .. ARGV[2]
local ttl_ms = tonumber(ARGV[4]) * 1000
local left_ms = redis.call('PTTL', KEYS[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'f', frame)
if left_ms < ttl_ms - math.min(1000, ttl_ms / 2) then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
end
"""
        + _fan_out(subs="KEYS[4]", frame="frame", writer="ARGV[6]", session="ARGV[7]", **fan_out)
        + "return seq\n"
    )


_APPEND_ONE = _append_one()
_APPEND = _CURRENT + _APPEND_ONE

# The same, but only while ARGV[8] (a lease) still holds the session (ARGV[7]); releases it. A
# retry of a finish that ran finds its own key and returns that seq again (not 0: the writer
# hands the `done` to its own sockets only when it has a seq).
_FINISH = (
    _CURRENT
    + """
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'key') == ARGV[5] then
  return tonumber(redis.call('HGET', KEYS[1], 'seq'))
end
if redis.call('HGET', KEYS[5], ARGV[7]) ~= ARGV[8] then return 0 end
redis.call('HDEL', KEYS[5], ARGV[7])
redis.call('ZREM', KEYS[6], ARGV[7])
"""
    + _APPEND_ONE
)

# A transient frame (no seq, not logged) to the session's sockets on other instances.
_ANNOUNCE = _fan_out(subs="KEYS[1]", frame="ARGV[1]", writer="ARGV[2]", session="ARGV[3]")

# A socket's instance joins the session's fan-out (ARGV[1]), for as long as the session lives.
_JOIN = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
"""

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A lease whose deadline passed is dead but still blocks the session until an instance claims it
# and closes the orphaned reply; so a new message never slips in before that reply's `done`. The
# lease's own holder asking again (a retry of an acquire that ran) is told yes: else it would be
# told `busy` by its own lease, left to block the session with no reply behind it.
_ACQUIRE = (
    """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then return held == ARGV[2] and 1 or 0 end
"""
    + _NOW_MS
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""
)

_RENEW = (
    """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
"""
    + _NOW_MS
    + """
local due = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
if due == nil or due <= now then return 0 end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""
)

_RELEASE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

_CLAIM = (
    _NOW_MS
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
local claimed = {}
for i, session in ipairs(due) do
  local old = redis.call('HGET', KEYS[1], session)
  redis.call('ZREM', KEYS[2], session)
  if old then
    local msg = string.match(old, '^[^|]*|(.*)|[^|]*$')
    local taken = ARGV[1] .. '|' .. msg .. '|' .. ARGV[2] .. i
    redis.call('HSET', KEYS[1], session, taken)
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), session)
    table.insert(claimed, session)
    table.insert(claimed, taken)
  end
end
return claimed
"""
)


# The shared secret: made by the first instance that asks, read by the others.
_SECRET = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""

# Never resets a session that has events (a retried or repeated create).
_CREATE = """
redis.call('HSETNX', KEYS[1], 'seq', 0)
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""

# One history turn, atomically: append, keep the last ARGV[2] (negative), refresh the TTLs. ARGV[4]
# is the turn's operation key ('' for none), remembered in the session's meta hash (KEYS[2]): the
# same key as the last turn's is a retry, and adds nothing. A session that is gone (expired, or
# evicted between its reply's last event and this turn) gets no turn: writing its meta would bring
# it back without a seq, and its next append would reuse seqs (the memory broker drops it too).
_ADD_TURN = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if ARGV[4] ~= '' then
  if redis.call('HGET', KEYS[2], 'turn') == ARGV[4] then return 0 end
  redis.call('HSET', KEYS[2], 'turn', ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], ARGV[2], -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# This instance (ARGV[1]) is alive for ARGV[2] ms more.
_ALIVE = (
    _NOW_MS
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600000)
"""
)

# A shared counter (KEYS[1]) is a hash of each instance's share: ARGV[1]'s is set to ARGV[3], as
# its write number ARGV[2], unless a later write of its own came first (a retried or late copy);
# the value is the sum of the shares of instances still alive (KEYS[2]). A dead instance's share
# stops counting when its liveness lapses, and is dropped here.
_COUNT = (
    _ALIVE
    + """
local mine = redis.call('HGET', KEYS[2], ARGV[1])
if not mine or tonumber(string.match(mine, '^(%d+):')) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. ':' .. ARGV[4])
end
redis.call('EXPIRE', KEYS[2], ARGV[5])
local total = 0
local shares = redis.call('HGETALL', KEYS[2])
for i = 1, #shares, 2 do
  local alive = redis.call('ZSCORE', KEYS[1], shares[i])
  if alive and tonumber(alive) > now then
    total = total + tonumber(string.match(shares[i + 1], ':(%d+)$'))
  else
    redis.call('HDEL', KEYS[2], shares[i])
  end
end
return total
"""
)


def _session_keys(session: str) -> tuple[str, str, str, str]:
    base = f"{PREFIX}:s:{session}"
    return f"{base}:meta", f"{base}:log", f"{base}:hist", f"{base}:subs"


def _events_channel(instance: str) -> str:
    return f"{PREFIX}:e:{instance}"


def _instance_channel(instance: str) -> str:
    return f"{PREFIX}:i:{instance}"


def _lease_text(lease: Lease) -> str:
    return f"{lease.owner}|{lease.msg_id}|{lease.token}"


def _lease_of(text: str) -> Lease:
    # Owner and token are ours (no "|"); the message id is the client's and may hold anything.
    owner, rest = text.split("|", 1)
    msg_id, token = rest.rsplit("|", 1)
    return Lease(owner=owner, msg_id=msg_id, token=token)


_TYPE_PREFIXES: dict[str, str] = {}  # event type -> '{"type":"delta"', encoded once per type


def _frame_parts(event: dict[str, Any]) -> tuple[str, str]:
    """Split the frame's JSON around its seq: '{"type":"delta","seq":' and ',"reply_to":...}'.

    One encode of the event (protocol.py builds every event with "type" first), not two."""
    kind = event["type"]
    prefix = _TYPE_PREFIXES.get(kind)
    if prefix is None:
        prefix = _TYPE_PREFIXES.setdefault(kind, '{"type":' + json.dumps(kind))
    text = encode(event)
    if not text.startswith(prefix):  # "type" was not the first key
        text = encode({"type": kind, **event})
    return prefix + ',"seq":', text[len(prefix) :]


class _unavailable:  # lower case: read as `with _unavailable("doing x"):`
    """Redis and network errors in the block become `BrokerUnavailable`. A class, not a
    `@contextmanager`: it wraps every broker call, and a generator-based one cost 2-3 % of the
    CPU in Redis mode (docs/benchmarks.md)."""

    __slots__ = ("action",)

    def __init__(self, action: str) -> None:
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        # (RedisClusterException, not a RedisError, is the cluster client's "no node can take it".)
        if not isinstance(exc, (RedisError, OSError, RedisClusterException)):
            return
        if cancelling():
            # redis-py turns a cancellation mid-command into a connection error; a caller that
            # retries BrokerUnavailable would then never see that its task was cancelled.
            raise asyncio.CancelledError from exc
        message = f"redis unavailable while {self.action}: {type(exc).__name__}"
        raise BrokerUnavailable(message) from exc


# A script's call, `(script, keys, args)`, and a plain command's, `(*argv)`: futures of replies.
ScriptCall = Callable[[Any, Sequence[str], list[Any]], Awaitable[Any]]
CommandCall = Callable[..., Awaitable[Any]]


class RedisBroker(LocalFanOut):
    """The broker on one Redis. Another Redis topology (redis_cluster.py) subclasses it: the
    hooks below (`_open_client`, `_call_paths`, `_keys`...) and the class attributes of keys
    and scripts are where it differs."""

    kind: ClassVar[str] = "redis"
    shared: ClassVar[bool] = True

    # Keys every instance shares, and the scripts whose keys differ by topology.
    INSTANCES: ClassVar[str] = INSTANCES
    SECRET: ClassVar[str] = SECRET
    EPOCH_KEY: ClassVar[str] = EPOCH_KEY
    APPEND_LUA: ClassVar[str] = _APPEND
    FINISH_LUA: ClassVar[str] = _FINISH
    ANNOUNCE_LUA: ClassVar[str] = _ANNOUNCE

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisBroker:
        return cls(settings)

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings
        self._redis: Any = self._open_client(settings)
        self._append = self._redis.register_script(self.APPEND_LUA)
        self._finish = self._redis.register_script(self.FINISH_LUA)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._claim = self._redis.register_script(_CLAIM)
        self._count = self._redis.register_script(_COUNT)
        self._alive = self._redis.register_script(_ALIVE)
        self._create = self._redis.register_script(_CREATE)
        self._secret_script = self._redis.register_script(_SECRET)
        self._secret: bytes | None = None
        self._add_turn = self._redis.register_script(_ADD_TURN)
        self._announce = self._redis.register_script(self.ANNOUNCE_LUA)
        self._join_script = self._redis.register_script(_JOIN)
        self._epoch = Epoch(self._epoch_changed, self.EPOCH_KEY)
        self._batched: ScriptCall
        self._command: CommandCall
        self._batched, self._command = self._call_paths()
        self._instance = ""
        self._on_control: ControlHandler = lambda message: None
        self._pubsub: Any = None
        self._listening_now: asyncio.Future[None] | None = None  # done while listening
        self._listening = False
        self._listened = False  # has listened at least once
        self._backoff_s = RECONNECT_BACKOFF_S[0]
        self._last_canary = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self.reconnects = 0
        # This instance's shares of shared counters: key -> (count, TTL, number of its last
        # write), and the keys whose last write Redis may not have had.
        self._shares: dict[str, tuple[int, int, int]] = {}
        self._share_writes = 0
        self._unsent: set[str] = set()

    # Hooks of the topology.

    def _open_client(self, settings: Settings) -> Any:
        """The redis-py client of this topology (connections open when used)."""
        # The rate limits' storage shares it, so it costs no extra connections.
        self.pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url or "",
            max_connections=settings.redis_max_connections,
            timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            health_check_interval=0,
            decode_responses=True,
            # After a Redis restart every pooled connection is dead, and redis-py's pool default
            # is no retry: each would fail one command. One immediate retry on a reconnected
            # connection rides that out. (Ambiguity about whether a command ran before its
            # connection died exists with or without it; the outage retries above have it too.)
            retry=Retry(NoBackoff(), 1),
        )
        use_hiredis_packing(self.pool)
        return aioredis.Redis(connection_pool=self.pool)

    def _call_paths(self) -> tuple[ScriptCall, CommandCall]:
        """How scripts `(script, keys, args)` and commands `(*argv)` travel to Redis.

        Nearly every call goes in the batches, on one connection of the pool; the pub/sub
        listener holds another, and replays and the health check use the rest."""
        self._batches = Batcher(self.pool, self._settings.redis_timeout_s, self._epoch)
        return self._batches.script, self._batches.command

    async def _close_client(self) -> None:
        with suppress(Exception):
            await self._batches.close(CLOSE_TIMEOUT_S)
        await self._redis.aclose()
        await self.pool.disconnect()

    def _keys(self, session: str) -> tuple[str, str, str, str]:
        """The session's meta, log, history and subscribers keys."""
        return _session_keys(session)

    def _guard(self, session: str) -> tuple[str, int]:
        """The hash whose `clock` a script that writes `session`'s events checks (`_CURRENT`),
        and the highest clock this instance saw of it."""
        return self._epoch.key, self._epoch.clock

    def _finish_keys(self, session: str) -> list[str]:
        """The keys of FINISH_LUA but the last (the guard's)."""
        return [*self._keys(session), LEASES, LEASE_DUE]

    def _counter_key(self, key: str) -> str:
        return key

    def _task_key(self, task: str) -> str:
        return f"{PREFIX}:task:{task}"

    @property
    def epoch(self) -> str:
        return self._epoch.id

    # Lifecycle, listener supervision and health.

    async def start(self, instance: str, on_control: ControlHandler) -> None:
        self._instance = instance
        self._on_control = on_control
        self._listening_now = asyncio.get_running_loop().create_future()
        for loop in (self._listen_forever(), self._canary_forever(), self._keep_alive_forever()):
            task = asyncio.create_task(loop)
            self._tasks.add(task)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        # Bounded: a shutdown must never hang on a connection attempt that ignores cancellation.
        _, stuck = await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT_S)
        if stuck:
            log.warning("redis broker closed with %d task(s) still stopping", len(stuck))
        if self._pubsub is not None:
            with suppress(Exception):
                await self._pubsub.aclose()
        await self._close_client()

    async def check(self) -> dict[str, Any]:
        listening, canary_age_s = self._listener_state()
        canary_age_s = round(canary_age_s, 3)
        try:
            async with asyncio.timeout(self._settings.redis_timeout_s):
                await self._ping()
            reachable = True
        except (RedisError, OSError, TimeoutError, RedisClusterException):
            reachable = False
        return {
            "ok": reachable and listening and canary_age_s < self._canary_deadline_s,
            "backend": self.kind,
            "reachable": reachable,
            "listening": listening,
            "canary_age_s": canary_age_s,
            "reconnects": self.reconnects,
            "epoch": self._epoch.id,
            "local_subscriptions": self.local_subscriptions,
        }

    def _listener_state(self) -> tuple[bool, float]:
        """Whether this instance hears its channels, and the seconds since its last canary."""
        return self._listening, time.monotonic() - self._last_canary

    async def _ping(self) -> None:
        await self._redis.ping()

    def stats(self) -> BrokerStats:
        return BrokerStats(reconnects=self.reconnects)

    def rate_limit_storage(self, key_prefix: str) -> RedisStorage:
        """`limits`' Redis storage on this broker's own connection pool, its sliding-window
        scripts (every message runs three, every reply two more) riding the pipelined batches
        instead of a pool checkout and a round trip each: a fifth of Redis mode's extra CPU per
        reply (docs/benchmarks.md)."""
        storage = RedisStorage(
            "async+redis://",
            implementation="redispy",
            # limits 5.x documents `connection_pool` but types every option as float | str | bool.
            connection_pool=self.pool,  # type: ignore[arg-type]
            key_prefix=key_prefix,
        )
        batch_sliding_window_scripts(storage, self._batched_script)
        return storage

    def _batched_script(
        self, script: Any
    ) -> Callable[[Sequence[str], Sequence[Any]], Awaitable[Any]]:
        """`script` (a redis-py `Script`) as a callable `(keys, args)` that runs in the batches,
        failing with `BrokerUnavailable`."""

        async def call(keys: Sequence[str], args: Sequence[Any]) -> Any:
            with _unavailable("checking a rate limit"):
                return await self._batched(script, keys, list(args))

        return call

    @property
    def _canary_deadline_s(self) -> float:
        return 3 * self._settings.redis_canary_interval_s + self._settings.redis_timeout_s

    async def _listen_forever(self) -> None:
        """The one pub/sub connection of this process, restarted with backoff whenever it fails,
        however long Redis stays away.

        redis-py reconnects a PubSub itself only for a few quick retries, then the listener dies;
        so every failure here ends in a fresh PubSub that subscribes this instance's two
        channels again, after which every local session is joined again and every local
        subscription re-reads the log (RESYNC) to recover what was published while it was deaf.
        """
        failures = 0
        while True:
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc  # the client library swallowed it
                if self._listening:  # lost: a new outage begins
                    self._listening_now = asyncio.get_running_loop().create_future()
                    failures = 0
                self._listening = False
                failures += 1
                # One warning per outage (and one a minute while it lasts), not one per attempt.
                level = logging.WARNING if failures % 60 == 1 else logging.DEBUG
                log.log(level, "redis pub/sub listener down (%s); reconnecting", exc)
                await asyncio.sleep(self._backoff_s)
                self._backoff_s = min(self._backoff_s * 2, RECONNECT_BACKOFF_S[1])

    async def _listen_once(self) -> None:
        if self._pubsub is not None:
            with suppress(Exception):
                await self._pubsub.aclose()
        pubsub = self._pubsub = self._redis.pubsub()
        control, events = _instance_channel(self._instance), _events_channel(self._instance)
        # The control channel goes last: Redis answers in order, so its confirmation means the
        # events channel is live too, and the resync below cannot miss anything.
        await pubsub.subscribe(events, control)
        # Until the subscription is confirmed the canary cannot arrive: that wait has its own
        # deadline. (Checking the canary's age before it, as this once did, failed every
        # reconnect after an outage longer than the canary deadline: the age counted the outage.)
        confirm_by = time.monotonic() + self._settings.redis_timeout_s
        while True:
            message = await pubsub.get_message(timeout=self._settings.redis_canary_interval_s)
            if cancelling():  # redis-py can take a cancellation mid-read for a quiet read
                raise asyncio.CancelledError
            if self._listening:
                if time.monotonic() - self._last_canary > self._canary_deadline_s:
                    raise ConnectionError("canary overdue: the subscription went deaf")
            elif time.monotonic() > confirm_by:
                raise ConnectionError("redis did not confirm the subscription in time")
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == "message":
                if channel == events:
                    session, _, frame = message["data"].partition(" ")
                    self._received(session, frame)
                else:
                    self._control(message["data"])
            elif kind == "subscribe" and channel == control:
                await self._on_listening()

    async def _on_listening(self) -> None:
        if self._listened:
            await self._check_epoch()  # before the resync: a new epoch makes sockets start over
            self.reconnects += 1
            log.info("redis pub/sub listener back; resyncing local sockets")
            # A Redis that restarted lost the `subs` sets: join every local session again. If
            # that fails, so does this attempt (BrokerUnavailable): the sockets are not live yet.
            await asyncio.gather(*(self._join(session) for session in self._local_sessions()))
        self._listened = self._listening = True
        self._backoff_s = RECONNECT_BACKOFF_S[0]
        self._last_canary = time.monotonic()
        if self._listening_now is not None and not self._listening_now.done():
            self._listening_now.set_result(None)
        self._signal_local(RESYNC)

    def _control(self, raw: str) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            return
        if "canary" in message:
            self._last_canary = time.monotonic()
            metrics.canary_received(message["canary"])
        else:
            self._on_control(message)

    async def _canary_forever(self) -> None:
        """Publish to ourselves; the listener's deadline catches a subscription gone deaf. And
        check the epoch, so an instance that writes nothing learns of lost data too."""
        channel = _instance_channel(self._instance)
        while True:
            await asyncio.sleep(self._settings.redis_canary_interval_s)
            with suppress(RedisError, OSError):
                await self._redis.publish(channel, json.dumps({"canary": time.time()}))
            if cancelling():  # a cancellation redis-py turned into a connection error
                raise asyncio.CancelledError
            with suppress(BrokerUnavailable):
                await self._check_epoch()

    async def _check_epoch(self) -> None:
        # An EpochChanged (here, or from the batch's own guard) is handled: _epoch_changed.
        with suppress(EpochChanged), _unavailable("checking the epoch"):
            self._epoch.guarded(await self._command(*self._epoch.guard_argv()))

    def _epoch_changed(self, epoch: str) -> None:
        """Redis lost data: every local socket starts over (resync or `session_expired`), and
        every reply this instance generates ends (`interrupted`)."""
        self._signal_local(NEW_EPOCH)
        self._secret = None  # a Redis that lost data lost it too
        self._on_control({"epoch": epoch})

    @property
    def _alive_ms(self) -> int:
        """How long this instance counts as alive after its last word (its shares with it)."""
        return int(self._canary_deadline_s * 1000)

    async def _keep_alive_forever(self) -> None:
        """Say every canary interval that this instance is alive, and send Redis again the shares
        of counters it may have missed. When the process dies, its shares stop counting within
        `_alive_ms`: a killed instance's sockets no longer hold their address's places."""
        while True:
            try:
                with _unavailable("saying this instance is alive"):
                    args = [self._instance, self._alive_ms]
                    await self._batched(self._alive, (self.INSTANCES,), args)
                for key in list(self._unsent):
                    await self._send_share(key)
            except BrokerUnavailable:
                pass  # said again at the next interval
            await asyncio.sleep(self._settings.redis_canary_interval_s)

    # Sessions and their event log.

    async def secret(self) -> bytes:
        if self._secret is None:
            with _unavailable("reading the shared secret"):
                made = secrets.token_hex(32)
                self._secret = bytes.fromhex(
                    await self._batched(self._secret_script, (self.SECRET,), [made])
                )
        return self._secret

    async def create_session(self, session: str) -> None:
        meta, *_ = self._keys(session)
        with _unavailable("creating a session"):
            await self._batched(self._create, (meta,), [self._settings.session_ttl_s])

    async def last_seq(self, session: str) -> int | None:
        meta, *_ = self._keys(session)
        with _unavailable("reading a session"):
            value = await self._command("HGET", meta, "seq")
        return None if value is None else int(value)

    def _event_args(self, session: str, event: dict[str, Any], key: str | None) -> list[Any]:
        head, tail = _frame_parts(event)
        settings = self._settings
        return [
            head,
            tail,
            settings.session_log_max_events,
            settings.session_ttl_s,
            key or "",
            self._instance,
            session,
        ]

    async def append(self, session: str, event: dict[str, Any], key: str | None = None) -> Event:
        args = self._event_args(session, event, key)
        guard, clock = self._guard(session)
        keys = [*self._keys(session), guard]
        with _unavailable("appending an event"):
            seq = int(await self._batched(self._append, keys, [*args, clock]))
        await self._appended(seq)
        return self._logged(session, event, seq, args)

    async def _appended(self, seq: int) -> None:
        """Raise what an append script's `seq` says went wrong, if anything."""
        if seq < 0:  # older data under an open connection: begin the new epoch now
            await self._check_epoch()
            raise EpochChanged(self._epoch.id)
        if not seq:
            raise SessionExpired(GONE)

    def _logged(self, session: str, event: dict[str, Any], seq: int, args: list[Any]) -> Event:
        """The event Redis logged as `seq`, delivered to this instance's sockets."""
        frame = args[0] + str(seq) + args[1]
        logged = Event(seq=seq, data={"type": event["type"], "seq": seq, **event}, frame=frame)
        self._deliver(session, logged)
        return logged

    async def finish(self, session: str, event: dict[str, Any], lease: Lease) -> bool:
        guard, clock = self._guard(session)
        keys = [*self._finish_keys(session), guard]
        # The lease's token makes the key: a retried finish returns the seq it got.
        args = [*self._event_args(session, event, f"{lease.token}:done"), _lease_text(lease)]
        with _unavailable("finishing a reply"):
            seq = int(await self._batched(self._finish, keys, [*args, clock]))
        if seq < 0:
            await self._appended(seq)
        if seq:
            self._logged(session, event, seq, args)
        return bool(seq)

    async def replay(self, session: str, after: int, max_bytes: int | None = None) -> list[Event]:
        _, stream, *_ = self._keys(session)
        count = None if max_bytes is None else REPLAY_BATCH
        events: list[Event] = []
        left = max_bytes
        with _unavailable("replaying a session"):
            while True:  # with `max_bytes`, a page: REPLAY_BATCH entries at a time
                # redis-py types XRANGE's reply for any client (bytes or text; None in a
                # pipeline): ours decodes, and XRANGE answers a list of (id, fields).
                entries = cast(
                    "list[tuple[str, dict[str, str]]]",
                    await self._redis.xrange(stream, min=f"({after}-0", max="+", count=count),
                )
                page = take_page((fields["f"] for _, fields in entries), left)
                events += page
                if left is None or len(entries) < REPLAY_BATCH:
                    return events
                left -= sum(len(event.frame) for event in page)
                if left <= 0:
                    return events
                after = page[-1].seq

    # Fan-out to this instance's sockets (LocalFanOut): a session with local sockets is in its
    # `subs` set, so its writers publish to this instance's events channel.

    def _join_remote(self, session: str) -> asyncio.Future[None]:
        return asyncio.ensure_future(self._join_when_listening(session))

    async def _leave_remote(self, session: str) -> None:
        # If this fails the set's TTL forgets this instance.
        *_, subs = self._keys(session)
        with _unavailable("unsubscribing from a session"):
            await self._command("SREM", subs, self._instance)

    async def _join_when_listening(self, session: str) -> None:
        # Live once both hold: this instance hears its events channel, and the session's writers
        # publish to it. Redis runs each script whole, so an event is either in the log by the
        # time the join is confirmed (the feed's replay, which follows, reads it) or published.
        assert self._listening_now is not None, "start() the broker first"
        await asyncio.shield(self._listening_now)
        await self._join(session)

    async def _join(self, session: str) -> None:
        *_, subs = self._keys(session)
        with _unavailable("subscribing to a session"):
            args = [self._instance, self._settings.session_ttl_s]
            await self._batched(self._join_script, (subs,), args)

    async def announce(self, session: str, frame: dict[str, Any]) -> None:
        *_, subs = self._keys(session)
        text = encode(frame)
        with _unavailable("announcing to a session"):
            await self._batched(self._announce, (subs,), [text, self._instance, session])
        self._deliver(session, text)

    async def signal(self, instance: str, message: dict[str, Any]) -> None:
        with _unavailable("sending a control message"):
            await self._command("PUBLISH", _instance_channel(instance), json.dumps(message))

    # Model context.

    async def history(self, session: str) -> list[Message]:
        _, _, hist, _ = self._keys(session)
        with _unavailable("reading history"):
            turns = await self._command("LRANGE", hist, 0, -1)
        return [json.loads(turn) for turn in turns]

    async def add_turn(self, session: str, role: str, content: str, key: str | None = None) -> None:
        meta, _, hist, _ = self._keys(session)
        turn = json.dumps({"role": role, "content": content})
        args = [turn, -2 * self._settings.history_turns, self._settings.session_ttl_s, key or ""]
        with _unavailable("adding to history"):
            await self._batched(self._add_turn, (hist, meta), args)

    # Leases.

    async def acquire(self, session: str, lease: Lease, ttl_s: float) -> bool:
        args = [session, _lease_text(lease), int(ttl_s * 1000)]
        with _unavailable("acquiring a lease"):
            return bool(await self._batched(self._acquire, (LEASES, LEASE_DUE), args))

    async def renew(self, session: str, lease: Lease, ttl_s: float) -> bool:
        args = [session, _lease_text(lease), int(ttl_s * 1000)]
        with _unavailable("renewing a lease"):
            return bool(await self._batched(self._renew, (LEASES, LEASE_DUE), args))

    async def release(self, session: str, lease: Lease) -> None:
        with _unavailable("releasing a lease"):
            await self._batched(self._release, (LEASES, LEASE_DUE), [session, _lease_text(lease)])

    async def lease(self, session: str) -> Lease | None:
        with _unavailable("reading a lease"):
            text = await self._command("HGET", LEASES, session)
        return None if text is None else _lease_of(text)

    async def claim_expired(self, claimant: str, ttl_s: float) -> list[tuple[str, Lease]]:
        args: list[str | int] = [claimant, new_id() + "-", int(ttl_s * 1000)]
        with _unavailable("claiming orphaned leases"):
            flat = await self._claim(keys=[LEASES, LEASE_DUE], args=args)
        return [(flat[i], _lease_of(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def adjust(self, key: str, delta: int, ttl_s: int) -> int:
        count = self._shares[key][0] + delta if key in self._shares else delta
        self._share_writes += 1
        self._shares[key] = (count, ttl_s, self._share_writes)
        return await self._send_share(key)

    async def _send_share(self, key: str) -> int:
        """Write this instance's share of counter `key` (absolute, so a copy that runs twice or
        late changes nothing); the counter's value. A share Redis may have missed is sent again
        by the keeper."""
        count, ttl_s, write = self._shares[key]
        args = [self._instance, self._alive_ms, write, count, ttl_s]
        try:
            with _unavailable("counting"):
                keys = (self.INSTANCES, self._counter_key(key))
                total = int(await self._batched(self._count, keys, args))
        except BrokerUnavailable:
            if self._shares.get(key, (0, 0, 0))[2] == write:  # no later write of the key since
                self._unsent.add(key)
            raise
        if self._shares.get(key, (0, 0, 0))[2] == write:
            self._unsent.discard(key)
            if not count:
                del self._shares[key]
        return total

    # Tasks of the HTTP ask API.

    async def put_task(self, task: str, record: dict[str, Any]) -> None:
        with _unavailable("storing a task"):
            await self._redis.set(
                self._task_key(task), json.dumps(record), ex=self._settings.session_ttl_s
            )

    async def get_task(self, task: str) -> dict[str, Any] | None:
        with _unavailable("reading a task"):
            raw = await self._redis.get(self._task_key(task))
        return None if raw is None else json.loads(raw)


if TYPE_CHECKING:  # mypy checks that it plays every role of a broker
    _: type[Broker] = RedisBroker
