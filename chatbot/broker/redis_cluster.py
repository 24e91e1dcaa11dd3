"""The Redis Cluster broker: `RedisBroker`'s sessions, log, leases and fan-out over many shards.

Chosen by REDIS_URL `redis+cluster://[user:password@]host:port[,host:port...]` (TLS:
`rediss+cluster://`, with the query options of `rediss://`): the hosts are where discovery
starts, any one that answers is enough. Needs Redis 7 (sharded pub/sub). It is `RedisBroker`
with another key layout, leases kept with their sessions, sharded pub/sub and a batcher per
shard. Every script still runs whole in one hash slot, so seq order, log order and publish order
agree as on one Redis, and every change stays idempotent (redis.py).

Key and slot layout (`{x}` is a hash tag: keys with the same tag share a slot, so a shard):

    chatbot:{S}:meta        hash    seq, last operation keys              } session S's slot:
    chatbot:{S}:log         stream  the event log                         } every call about
    chatbot:{S}:hist        list    model context turns                   } S runs on the
    chatbot:{S}:subs        set     instances with sockets on S           } shard that holds
    chatbot:{S}:lease       hash    held = "owner|msg_id|token", due (ms) } it, in one script
    channel chatbot:{S}:e:{I}       S's live events for instance I, SPUBLISHed by the scripts
                                    that append (to the other instances in `subs`)
    chatbot:{H}:mark         string  "this slot holds data" (H: a tag in that slot, per slot)
    chatbot:{leases-K-N}:due zset   lease index bucket K (of 16): session -> deadline hint
    channel chatbot:{i:I}:c         control messages for instance I (stop)
    channel chatbot:{k:I:N}         instance I's canary on one shard (N picked for a slot of it)
    chatbot:{chatbot}:instances zset   instance -> alive until (ms)             } one shard
    chatbot:{chatbot}:secret    string the secret that signs unstored ids       } (the slot of
    chatbot:{chatbot}:epoch     hash   id, clock (redis_epoch.py)               } "chatbot"):
    chatbot:{chatbot}:count:K   hash   instance -> its share of counter K       } small, shared
    chatbot:{chatbot}:slots     bitmap the slots that have held sessions        }
    chatbot:task:{T}            string an HTTP ask API task (its own slot)
    chatbot:limits:{...}        the rate limits' sliding windows (`limits` tags each key)

S's meta, log, hist and subs get and keep their TTLs as on one Redis (redis.py); its lease, like
one Redis's lease keys, has none, so that a `volatile-*` eviction policy never takes a held one.
So a session costs its shard what it costs one Redis, and sessions spread over the shards by
their ids. The `{chatbot}` shard carries, besides its share of sessions, what every instance
shares: liveness, counters (a socket's open and close each update one), the secret, the epoch.

**Leases, per shard.** A session's lease lives in its own slot, so `finish` appends the `done`
and releases the lease in one script, as on one Redis. For the orphan sweep, an instance writes
the session into a lease index before it acquires: 16 bucket zsets whose tags are picked so the
buckets spread evenly over the slots (bucket K covers the sessions of slots K*1024..K*1024+1023,
and lives in one of them: on the usual even split, mostly on the shard of its sessions). The
sweep reads each bucket's entries past their deadline and runs the claim script in each
session's own slot, which decides there: an expired lease is claimed, a renewed one has its
entry moved to its new deadline, an entry with no lease behind it is dropped (only if nobody
wrote it meanwhile). Renewals and releases touch only the session's slot. A bucket lost with
its shard's data is refilled as leases are taken again: the new epoch that loss begins ends
every reply, and so releases the leases the bucket indexed.

**Fan-out, per shard.** One pub/sub connection per shard (master) per process, whatever the
number of sockets: it holds the channels of this instance's sessions on that shard, and a canary
channel of the shard, published every REDIS_CANARY_INTERVAL_S; the connection is replaced when
the canary is overdue, as on one Redis. A slot that moves (resharding: Redis unsubscribes its
channels) or a shard whose master fails (its replica promoted) moves the channels to the shard
that now serves them; once they are confirmed there, the instance joins their sessions again
and their sockets re-read the log (RESYNC), so whatever was published meanwhile is recovered.
The broker is ready (/readyz) while some master answers and every connection that listens
hears its canary: a shard failing over is down for every instance alike (as the model service
is), so it makes none of them unready; /readyz details each shard's connection.

**Calls.** Each shard's calls go in its own pipelined batches (redis_batches.py); a call that
Redis redirects (MOVED, ASK, TRYAGAIN, CLUSTERDOWN: it did not run) goes again through
redis-py's cluster client, which follows the redirection and learns the new slot map. So a
process holds, per master: one pub/sub connection, one for the batches, and up to
REDIS_MAX_CONNECTIONS for replays, redirected calls and the health check.

**Epoch.** The dataset's epoch (redis_epoch.py) lives on the `{chatbot}` shard, checked every
canary interval and when a shard's pub/sub reconnects: a new one begins when that shard comes
back empty (the secret, counters and liveness went with it). Any other shard that comes back
empty or with older data begins a new epoch too, found by the call that meets it:
- storing a slot's first session writes the slot's marker there, then sets the slot's bit in
  `slots`; a session unknown in a slot whose bit is set and whose marker is gone (still, after
  the bit was read) means the shard lost the slot's data (a master restarted empty, or failed
  over to a replica that had not synced it yet);
- a writer remembers the last seq it wrote in each session where it streams a reply; an append
  that finds the session's seq lower (a replica that missed the last writes took over) writes
  nothing.
Either way the instance begins a new epoch, with a new secret (the ids of sessions not stored
yet are void, as when one Redis loses everything): every instance tells its sockets, which
resync or hear `session_expired`, and ends its replies `interrupted`. Not detected: a shard that
lost only the last writes of sessions nobody is writing to (their sockets replay what is left,
under the same epoch), and the loss of a slot whose first session's instance died between
writing the marker and setting the bit, until another instance stores a session there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, ClassVar, Final

import hiredis
import redis.asyncio as aioredis
from limits.aio.storage import RedisClusterStorage
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ClusterError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from .. import metrics
from ..errors import BrokerUnavailable
from ..patches.limits import batch_sliding_window_scripts
from ..patches.redis import ask_on_one_connection, pack_command, streams
from ..protocol import new_id
from ..settings import Settings
from .base import RESYNC, Broker, Event, Lease, cancelling, expiry_slack_s
from .redis import (
    _CURRENT,
    _NOW_MS,
    CLOSE_TIMEOUT_S,
    PREFIX,
    RECONNECT_BACKOFF_S,
    CommandCall,
    RedisBroker,
    ScriptCall,
    _append_one,
    _fan_out,
    _lease_of,
    _lease_text,
    _unavailable,
)
from .redis_batches import Batcher

log = logging.getLogger(__name__)

SHARED: Final = f"{PREFIX}:{{chatbot}}"  # the keys every instance shares, in one slot
LEASE_BUCKETS: Final = 16
SWEEP_BATCH: Final = 100  # due entries a bucket yields per sweep
TOPOLOGY_CHECK_S: Final = 30.0  # the slot map is read again at least this often
TRY_AGAIN_S: Final = 0.05  # between tries of a call on a slot being moved (TRYAGAIN)
READ_SIZE: Final = 65536
SEEN_MAX: Final = 10_000  # sessions whose last seq a writer remembers, before it forgets old ones
SEEN_S: Final = 600.0  # what "old" means then
# The first word of an error reply to a call that did not run because its slot is elsewhere
# (or moving, or the cluster is down for now).
REDIRECTIONS: Final = frozenset({"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"})


def _bucket_tags() -> list[str]:
    """A hash tag for each lease bucket, bucket K's in slots K*1024..K*1024+1023."""
    width = REDIS_CLUSTER_HASH_SLOTS // LEASE_BUCKETS
    tags = []
    for bucket in range(LEASE_BUCKETS):
        n = 0
        while key_slot(f"leases-{bucket}-{n}".encode()) // width != bucket:
            n += 1
        tags.append(f"leases-{bucket}-{n}")
    return tags


BUCKETS: Final = [f"{PREFIX}:{{{tag}}}:due" for tag in _bucket_tags()]


def _session_keys(session: str) -> tuple[str, str, str, str]:
    base = f"{PREFIX}:{{{session}}}"
    return f"{base}:meta", f"{base}:log", f"{base}:hist", f"{base}:subs"


def _lease_key(session: str) -> str:
    return f"{PREFIX}:{{{session}}}:lease"


def _bucket(session: str) -> str:
    return BUCKETS[_slot(session) * LEASE_BUCKETS // REDIS_CLUSTER_HASH_SLOTS]


def _events_channel(session: str, instance: str) -> str:
    return f"{PREFIX}:{{{session}}}:e:{instance}"


def _control_channel(instance: str) -> str:
    return f"{PREFIX}:{{i:{instance}}}:c"


def _first_hex_in_each_slot() -> tuple[str, ...]:
    """For each slot, the first hex number (as text) whose slot it is. One pass over 0, 1, 2, ...
    finds them all (the last at 314,737: ~0.2 s, once, as the module loads); a search per slot
    took ~16,000 `key_slot` calls (~10 ms of a held event loop) for every session that landed in
    a slot not seen before, most of an instance's CPU while sessions were new."""
    tags: dict[int, str] = {}
    n = 0
    while len(tags) < REDIS_CLUSTER_HASH_SLOTS:
        tag = b"%x" % n
        slot = key_slot(tag)
        if slot not in tags:
            tags[slot] = tag.decode()
        n += 1
    return tuple(tags[slot] for slot in range(REDIS_CLUSTER_HASH_SLOTS))


_SLOT_TAGS: Final = _first_hex_in_each_slot()


def _marker(slot: int) -> str:
    """The key that says `slot` holds data: its tag is the first hex number in that slot."""
    return f"{PREFIX}:{{{_SLOT_TAGS[slot]}}}:mark"


def _slot(session: str) -> int:
    return key_slot(_lease_key(session).encode())


def _channel(session: str) -> str:
    """Lua: the events channel of `instance` for the session (a Lua expression)."""
    return f"'{PREFIX}:{{' .. {session} .. '}}:e:' .. instance"


_FAN_OUT: Final = {"publish": "SPUBLISH"}

# As RedisBroker's, with sharded publishes; the lease (KEYS[5]) is the session's own hash. The
# guard is the session's meta hash, and the last argument the last seq this writer saw there: a
# lower seq means the shard went back to older data (-1, writing nothing).
_CURRENT_SEQ = _CURRENT.replace("'clock'", "'seq'")
_APPEND = _CURRENT_SEQ + _append_one(channel=_channel("ARGV[7]"), **_FAN_OUT)
_FINISH = (
    _CURRENT_SEQ
    + """
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'key') == ARGV[5] then
  return tonumber(redis.call('HGET', KEYS[1], 'seq'))
end
if redis.call('HGET', KEYS[5], 'held') ~= ARGV[8] then return 0 end
redis.call('DEL', KEYS[5])
"""
    + _append_one(channel=_channel("ARGV[7]"), **_FAN_OUT)
)
_ANNOUNCE = _fan_out(
    subs="KEYS[1]",
    frame="ARGV[1]",
    writer="ARGV[2]",
    session="ARGV[3]",
    channel=_channel("ARGV[3]"),
    **_FAN_OUT,
)
# A session's seq (KEYS[1], its meta), or when it is unknown: -1 if its slot holds data (the
# marker KEYS[2]), -2 if not.
_LAST_SEQ = """
local seq = redis.call('HGET', KEYS[1], 'seq')
if seq then return tonumber(seq) end
return redis.call('EXISTS', KEYS[2]) - 2
"""
# As RedisBroker's, and the slot's marker (KEYS[2]) set.
_CREATE = """
redis.call('HSETNX', KEYS[1], 'seq', 0)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], 1)
"""
# The slot ARGV[1] is registered in the bitmap KEYS[1].
_REGISTER = "redis.call('SETBIT', KEYS[1], ARGV[1], 1)"
# A new epoch (ARGV[2]) and secret (ARGV[3]), unless the epoch is no longer ARGV[1] (another
# instance began one already).
_NEW_EPOCH = """
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'id', ARGV[2])
  redis.call('SET', KEYS[2], ARGV[3])
end
"""
# A control message or canary: the channel goes as the key, so the call runs on its shard.
_PUBLISH = "return redis.call('SPUBLISH', KEYS[1], ARGV[1])"

# Leases: KEYS[1] is the session's lease hash, ARGV[1] the lease, ARGV[2] a TTL in ms. The rules
# are RedisBroker's (an expired lease blocks until claimed; its holder asking again is told yes).
_ACQUIRE = (
    """
local held = redis.call('HGET', KEYS[1], 'held')
if held then return held == ARGV[1] and 1 or 0 end
"""
    + _NOW_MS
    + """
redis.call('HSET', KEYS[1], 'held', ARGV[1], 'due', now + tonumber(ARGV[2]))
return 1
"""
)
_RENEW = (
    """
if redis.call('HGET', KEYS[1], 'held') ~= ARGV[1] then return 0 end
"""
    + _NOW_MS
    + """
local due = tonumber(redis.call('HGET', KEYS[1], 'due'))
if due == nil or due <= now then return 0 end
redis.call('HSET', KEYS[1], 'due', now + tonumber(ARGV[2]))
return 1
"""
)
_RELEASE = """
if redis.call('HGET', KEYS[1], 'held') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""
# The lease index. Entered before acquiring (ARGV[1], the session, due in ARGV[2] ms at most: an
# older, earlier hint stays, and is checked sooner).
_INDEX = (
    _NOW_MS
    + """
redis.call('ZADD', KEYS[1], 'LT', now + tonumber(ARGV[2]), ARGV[1])
"""
)
# The bucket's entries past their hint, with their scores as Redis wrote them.
_DUE = (
    _NOW_MS
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, ARGV[1])
"""
)
# In the session's slot: {0} no lease; {1, due} held and not due; {2, due, lease} claimed for
# ARGV[1] with token ARGV[2], for ARGV[3] ms.
_CLAIM = (
    """
local held = redis.call('HGET', KEYS[1], 'held')
if not held then return {0} end
"""
    + _NOW_MS
    + """
local due = tonumber(redis.call('HGET', KEYS[1], 'due') or 0)
if due > now then return {1, due} end
local msg = string.match(held, '^[^|]*|(.*)|[^|]*$')
local taken = ARGV[1] .. '|' .. msg .. '|' .. ARGV[2]
due = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'held', taken, 'due', due)
return {2, due, taken}
"""
)
# Back in the bucket: the entry ARGV[1] moves to score ARGV[3] ('' drops it), unless its score
# is no longer ARGV[2] (an instance indexed the session again meanwhile: its entry stands).
_RESCORE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
"""


def _cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The startup nodes of a `redis+cluster://` URL, and the connection options it sets (as
    `redis://` URLs do: user, password, TLS and the query's options)."""
    scheme, _, rest = url.partition("://")
    plain = "rediss" if scheme.lower().startswith("rediss") else "redis"
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    nodes = []
    for entry in hosts.split(","):
        entry = entry.strip()
        if entry.startswith("["):  # [IPv6]:port
            name, _, port = entry[1:].partition("]")
            port = port.removeprefix(":")
        else:
            name, _, port = entry.partition(":")
        if not name or not (port or "6379").isdigit():
            raise ValueError(f"REDIS_URL: expected host:port, got {entry!r}")
        nodes.append((name, int(port or 6379)))
    host, number = nodes[0]
    first = f"[{host}]:{number}" if ":" in host else f"{host}:{number}"
    options: dict[str, Any] = dict(parse_url(f"{plain}://{userinfo}{at}{first}/{path}?{query}"))
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    if options.pop("db", 0):
        raise ValueError("REDIS_URL: a Redis Cluster has only database 0")
    if plain == "rediss":
        options["ssl"] = True
    return nodes, options


def _redirected(exc: ResponseError) -> bool:
    return str(exc).split(" ", 1)[0] in REDIRECTIONS


class RedisClusterBroker(RedisBroker):
    """`RedisBroker` on a Redis Cluster (the module docstring says how it spreads)."""

    kind = "redis-cluster"

    INSTANCES: ClassVar[str] = f"{SHARED}:instances"
    SECRET: ClassVar[str] = f"{SHARED}:secret"
    EPOCH_KEY: ClassVar[str] = f"{SHARED}:epoch"
    SLOTS: ClassVar[str] = f"{SHARED}:slots"
    APPEND_LUA: ClassVar[str] = _APPEND
    FINISH_LUA: ClassVar[str] = _FINISH
    ANNOUNCE_LUA: ClassVar[str] = _ANNOUNCE

    def __init__(self, settings: Settings) -> None:
        self._nodes, self._options = _cluster_url(settings.redis_url or "")
        # By node name: each master's batcher, and the pool its connection comes from.
        self._batchers: dict[str, tuple[Batcher, aioredis.ConnectionPool]] = {}
        super().__init__(settings)
        register = self._redis.register_script
        self._publish = register(_PUBLISH)
        self._lease_acquire, self._lease_renew = register(_ACQUIRE), register(_RENEW)
        self._lease_release, self._lease_claim = register(_RELEASE), register(_CLAIM)
        self._index, self._due, self._rescore = register(_INDEX), register(_DUE), register(_RESCORE)
        self._last_seq, self._create_marked = register(_LAST_SEQ), register(_CREATE)
        self._register, self._new_epoch = register(_REGISTER), register(_NEW_EPOCH)
        # Epoch checks: the slots this instance registered, and per session it writes the last
        # seq it wrote there and when (the session lives SESSION_TTL_S past that, less at most
        # `expiry_slack_s`).
        self._registered: set[int] = set()
        self._seen: dict[str, tuple[int, float]] = {}
        # Pub/sub: the channels this instance hears (-> the session each serves, None for the
        # control channel), the shard each is on, and one `_Shard` per master.
        self._channels: dict[str, str | None] = {}
        self._owner: dict[str, str] = {}
        self._shards: dict[str, _Shard] = {}
        # Per channel: done once first confirmed; the channels lost since (to resubscribe).
        self._live: dict[str, asyncio.Future[None]] = {}
        self._lost: set[str] = set()
        self._stale = asyncio.Event()  # the slot map may have changed: read it again
        self._topology_read = False
        self._heard_all = False  # every shard's connection has listened at once
        self._chores: set[asyncio.Task[None]] = set()

    # The topology's hooks.

    def _open_client(self, settings: Settings) -> RedisCluster:
        options = {
            "max_connections": settings.redis_max_connections,  # per node
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
            **self._options,
        }
        nodes = [ClusterNode(host, port) for host, port in self._nodes]
        ask_on_one_connection()  # or a call on a key of a slot being moved fails (patches/redis)
        # The shards that are up serve their slots while another fails over.
        return RedisCluster(
            startup_nodes=nodes, decode_responses=True, require_full_coverage=False, **options
        )

    def _call_paths(self) -> tuple[ScriptCall, CommandCall]:
        return self._script_call, self._command_call

    async def _close_client(self) -> None:
        shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            shard.task.cancel()
        for task in self._chores:
            task.cancel()
        waiting = [shard.task for shard in shards] + list(self._chores)
        if waiting:
            await asyncio.wait(waiting, timeout=CLOSE_TIMEOUT_S)
        for batcher, pool in self._batchers.values():
            with suppress(Exception):
                await batcher.close(CLOSE_TIMEOUT_S)
                await pool.disconnect()
        await self._redis.aclose()

    def _keys(self, session: str) -> tuple[str, str, str, str]:
        return _session_keys(session)

    def _guard(self, session: str) -> tuple[str, int]:
        seen = self._seen.get(session)
        # Past the earliest the session may have expired, its seq may be gone: no guard then.
        ttl_s = self._settings.session_ttl_s
        fresh = seen is not None and time.monotonic() - seen[1] < ttl_s - expiry_slack_s(ttl_s)
        return _session_keys(session)[0], seen[0] if seen is not None and fresh else 0

    def _finish_keys(self, session: str) -> list[str]:
        return [*_session_keys(session), _lease_key(session)]

    def _counter_key(self, key: str) -> str:
        return f"{SHARED}:count:{key}"  # with the instances it sums over

    def _task_key(self, task: str) -> str:
        return f"{PREFIX}:task:{{{task}}}"

    async def _ping(self) -> None:
        """Some master answers (the others may be failing over)."""
        masters = self._redis.get_primaries()
        pings = [self._redis.ping(target_nodes=master) for master in masters]
        answers = await asyncio.gather(*pings, return_exceptions=True)
        if masters and all(isinstance(answer, BaseException) for answer in answers):
            raise answers[0]

    async def check(self) -> dict[str, Any]:
        health = await super().check()
        now = time.monotonic()
        health["shards"] = {
            name: {"listening": shard.listening, "canary_age_s": round(now - shard.last_canary, 3)}
            for name, shard in self._shards.items()
        }
        return health

    def rate_limit_storage(self, key_prefix: str) -> RedisClusterStorage:
        """`limits`' cluster storage, its sliding-window scripts riding this broker's batches
        (its own client is not used by the limits chatbot applies)."""
        hosts = ",".join(f"{host}:{port}" for host, port in self._nodes)
        storage = RedisClusterStorage(
            f"async+redis+cluster://{hosts}",
            implementation="redispy",
            key_prefix=key_prefix,
            **self._options,
        )
        batch_sliding_window_scripts(storage, self._batched_script)
        return storage

    # Calls: each shard's in its own batches; a redirected one through the cluster client.

    def _batcher(self, key: str) -> Batcher | None:
        nodes = self._redis.nodes_manager.slots_cache.get(key_slot(key.encode()))
        if not nodes:
            return None  # the slot map is not read yet (or the slot is not served)
        node = nodes[0]
        if node.name not in self._batchers:
            pool = aioredis.ConnectionPool(
                connection_class=node.connection_class, max_connections=2, **node.connection_kwargs
            )
            self._batchers[node.name] = Batcher(pool, self._settings.redis_timeout_s), pool
        return self._batchers[node.name][0]

    async def _batcher_for(self, key: str) -> Batcher | None:
        """The batcher of `key`'s master, once the slot map is read: the first calls wait for
        it rather than go through the cluster client, whose per-node pools of
        REDIS_MAX_CONNECTIONS refuse a burst (redis-py 8 raises MaxConnectionsError instead of
        waiting)."""
        batcher = self._batcher(key)
        if batcher is None and not self._redis.nodes_manager.slots_cache:
            await self._redis.initialize()  # once: redis-py's lock makes the rest wait for it
            batcher = self._batcher(key)
        return batcher

    async def _script_call(self, script: Any, keys: Sequence[str], args: list[Any]) -> Any:
        batcher = await self._batcher_for(keys[0])
        if batcher is not None:
            try:
                return await batcher.script(script, keys, args)
            except ResponseError as exc:
                if not _redirected(exc):
                    raise
                self._topology_changed()
            except (RedisConnectionError, OSError):
                self._topology_changed()  # its master may have failed over
                raise
        return await self._redirected(self._redis.eval, script.script, len(keys), *keys, *args)

    async def _command_call(self, *argv: Any) -> Any:
        # EVAL's key follows the script and the number of keys.
        key = argv[3] if argv[0] in ("EVAL", "EVALSHA") else argv[1]
        batcher = await self._batcher_for(key)
        if batcher is not None:
            try:
                return await batcher.command(*argv)
            except ResponseError as exc:
                if not _redirected(exc):
                    raise
                self._topology_changed()
            except (RedisConnectionError, OSError):
                self._topology_changed()
                raise
        return await self._redirected(self._redis.execute_command, *argv)

    async def _redirected(self, call: Any, *argv: Any) -> Any:
        """`call(*argv)` through redis-py's cluster client, which follows MOVED and ASK. While a
        slot moves, a call on its keys split between the two masters is answered TRYAGAIN (it
        did not run) until the last of them moved; redis-py gives up after about 0.4 s
        ("TTL exhausted"), so it is tried again, up to REDIS_TIMEOUT_S."""
        deadline = time.monotonic() + self._settings.redis_timeout_s
        while True:
            try:
                return await call(*argv)
            except ClusterError as exc:
                # Only "TTL exhausted" itself: its subclasses (CLUSTERDOWN, a master down) are
                # a failover, which fails fast as a down Redis does.
                if type(exc) is not ClusterError or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(TRY_AGAIN_S)

    # Sessions, and the epoch of each shard's data (module docstring, "Epoch").

    async def last_seq(self, session: str) -> int | None:
        slot = _slot(session)
        keys = (_session_keys(session)[0], _marker(slot))
        with _unavailable("reading a session"):
            seq = int(await self._batched(self._last_seq, keys, []))
            if seq == -2:  # unknown, in a slot with no marker
                await self._check_slot(slot)
        return None if seq < 0 else seq

    async def create_session(self, session: str) -> None:
        slot = _slot(session)
        keys = (_session_keys(session)[0], _marker(slot))
        with _unavailable("creating a session"):
            await self._batched(self._create_marked, keys, [self._settings.session_ttl_s])
            if slot not in self._registered:  # after the marker: a registered slot has one
                await self._batched(self._register, (self.SLOTS,), [slot])
                self._registered.add(slot)

    async def _check_slot(self, slot: int) -> None:
        """`slot` has no marker: it never held a session, or its shard lost its data (it was
        registered, and its marker is still gone after that was read: a session being created
        there meanwhile marks it before registering it)."""
        if not await self._command("GETBIT", self.SLOTS, slot):
            return
        marker = _marker(slot)
        if await self._command("EXISTS", marker):
            return
        await self._lost_data(f"slot {slot} lost its data")
        await self._command("SET", marker, 1)

    async def _lost_data(self, what: str) -> None:
        """A shard lost data (`what`): begin a new epoch, and learn it."""
        log.warning("redis cluster: %s; a new epoch begins", what)
        if not self._epoch.id:  # the epoch that ends must be known, to end it only once
            await self._check_epoch()
        args = [self._epoch.id, new_id(), secrets.token_hex(32)]
        await self._batched(self._new_epoch, (self.EPOCH_KEY, self.SECRET), args)
        await self._check_epoch()

    async def _appended(self, seq: int) -> None:
        if seq < 0:  # the session's seq went back: its shard went back to older data
            with _unavailable("beginning a new epoch"):
                await self._lost_data("a session's seq went back")
        await super()._appended(seq)

    def _logged(self, session: str, event: dict[str, Any], seq: int, args: list[Any]) -> Event:
        now = time.monotonic()
        if len(self._seen) >= SEEN_MAX and session not in self._seen:
            # Replies that never finished here (another instance closed them): forget the
            # sessions not written for a while; their guard is only lost, never wrong.
            self._seen = {s: seen for s, seen in self._seen.items() if now - seen[1] < SEEN_S}
        self._seen[session] = (seq, now)
        return super()._logged(session, event, seq, args)

    async def finish(self, session: str, event: dict[str, Any], lease: Lease) -> bool:
        finished = await super().finish(session, event, lease)
        self._seen.pop(session, None)  # the reply is over: nothing more to guard
        return finished

    def _epoch_changed(self, epoch: str) -> None:
        self._seen.clear()  # seqs of another epoch
        super()._epoch_changed(epoch)

    # Leases, with their sessions; the index that the sweep walks, in buckets.

    async def acquire(self, session: str, lease: Lease, ttl_s: float) -> bool:
        ttl_ms = int(ttl_s * 1000)
        with _unavailable("acquiring a lease"):
            # Indexed first: a lease the sweep cannot find would block its session for good.
            await self._batched(self._index, (_bucket(session),), [session, ttl_ms])
            args = [_lease_text(lease), ttl_ms]
            return bool(await self._batched(self._lease_acquire, (_lease_key(session),), args))

    async def renew(self, session: str, lease: Lease, ttl_s: float) -> bool:
        args = [_lease_text(lease), int(ttl_s * 1000)]
        with _unavailable("renewing a lease"):
            return bool(await self._batched(self._lease_renew, (_lease_key(session),), args))

    async def release(self, session: str, lease: Lease) -> None:
        with _unavailable("releasing a lease"):
            await self._batched(self._lease_release, (_lease_key(session),), [_lease_text(lease)])

    async def lease(self, session: str) -> Lease | None:
        with _unavailable("reading a lease"):
            text = await self._command("HGET", _lease_key(session), "held")
        return None if text is None else _lease_of(text)

    async def claim_expired(self, claimant: str, ttl_s: float) -> list[tuple[str, Lease]]:
        token = new_id() + "-"
        ttl_ms = int(ttl_s * 1000)
        with _unavailable("claiming orphaned leases"):
            found = await asyncio.gather(
                *(
                    self._sweep(bucket, claimant, f"{token}{n}.", ttl_ms)
                    for n, bucket in enumerate(BUCKETS)
                )
            )
        return [claimed for bucket in found for claimed in bucket]

    async def _sweep(
        self, bucket: str, claimant: str, token: str, ttl_ms: int
    ) -> list[tuple[str, Lease]]:
        flat = await self._batched(self._due, (bucket,), [SWEEP_BATCH])
        claimed = []
        for i in range(0, len(flat), 2):
            session, score = flat[i], flat[i + 1]
            args = [claimant, f"{token}{i // 2}", ttl_ms]
            found = await self._batched(self._lease_claim, (_lease_key(session),), args)
            if found[0] == 2:
                claimed.append((session, _lease_of(found[2])))
            rescore = "" if found[0] == 0 else found[1]
            await self._batched(self._rescore, (bucket,), [session, score, rescore])
        return claimed

    # Fan-out over sharded pub/sub.

    async def signal(self, instance: str, message: dict[str, Any]) -> None:
        with _unavailable("sending a control message"):
            await self._batched(self._publish, (_control_channel(instance),), [json.dumps(message)])

    async def _join_when_listening(self, session: str) -> None:
        # Live once both hold, as on one Redis: this instance hears the session's channel on
        # its shard, and the session's writers publish to it (`subs`).
        await asyncio.shield(self._want(_events_channel(session, self._instance), session))
        await self._join(session)

    async def _leave_remote(self, session: str) -> None:
        self._unwant(_events_channel(session, self._instance))
        await super()._leave_remote(session)

    def _listener_state(self) -> tuple[bool, float]:
        """Listening once every shard's connection has listened (with its channels: this
        instance's control channel among them), and then while some shard's does; the oldest
        canary of those that do. A shard that is down is every instance's to report, not this
        one's."""
        shards = list(self._shards.values())
        listening = [shard for shard in shards if shard.listening]
        if not self._heard_all and shards and len(listening) == len(shards):
            self._heard_all = True
        now = time.monotonic()
        age = max((now - shard.last_canary for shard in listening), default=0.0)
        return self._heard_all and bool(listening), age

    async def _listen_forever(self) -> None:
        """Keep one `_Shard` per master and every channel on the shard that serves it: the slot
        map is read again whenever something says it changed (a shard's connection failed, a
        slot moved, a call was redirected), and at least every TOPOLOGY_CHECK_S."""
        self._want(_control_channel(self._instance), None)
        backoff = RECONNECT_BACKOFF_S[0]
        failures = 0
        while True:
            self._stale.clear()
            try:
                async with asyncio.timeout(2 * self._settings.redis_timeout_s):
                    if self._topology_read:
                        await self._redis.nodes_manager.initialize()
                    else:
                        await self._redis.initialize()
                        self._topology_read = True
                        await self._check_epoch()
                if cancelling():  # redis-py took it for a failed node and read the next one
                    raise asyncio.CancelledError
                self._reroute()
                failures = 0
                if self._stale.is_set():  # a slot is not served yet (a master failing over)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RECONNECT_BACKOFF_S[1])
                    continue
                backoff = RECONNECT_BACKOFF_S[0]
                with suppress(TimeoutError):
                    async with asyncio.timeout(TOPOLOGY_CHECK_S):
                        await self._stale.wait()
                await asyncio.sleep(RECONNECT_BACKOFF_S[0])  # coalesce a burst of signals
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc
                failures += 1
                level = logging.WARNING if failures % 60 == 1 else logging.DEBUG
                log.log(level, "redis cluster slot map unreadable (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_S[1])

    def _topology_changed(self) -> None:
        self._stale.set()

    def _reroute(self) -> None:
        """A `_Shard` for each master that serves slots, and each channel on its slot's."""
        masters: dict[str, ClusterNode] = {}
        for nodes in self._redis.nodes_manager.slots_cache.values():
            masters.setdefault(nodes[0].name, nodes[0])
        for name, node in masters.items():
            if name in self._shards:
                self._shards[name].node = node
            else:
                self._shards[name] = _Shard(self, node)
        for channel in list(self._channels):
            self._assign(channel)
        for name in [name for name in self._shards if name not in masters]:
            shard = self._shards.pop(name)
            for channel in shard.confirmed:
                self._channel_lost(channel)
            shard.task.cancel()
            self._chores.add(shard.task)  # held until it has closed its connection
            shard.task.add_done_callback(self._chores.discard)

    def _want(self, channel: str, session: str | None) -> asyncio.Future[None]:
        """Hear `channel` (for `session`'s sockets); done once its shard confirmed it."""
        self._channels[channel] = session
        live = self._live.get(channel)
        if live is None:
            live = self._live[channel] = asyncio.get_running_loop().create_future()
        self._assign(channel)
        return live

    def _unwant(self, channel: str) -> None:
        self._channels.pop(channel, None)
        self._lost.discard(channel)
        live = self._live.pop(channel, None)
        if live is not None and not live.done():
            live.cancel()
        shard = self._shards.get(self._owner.pop(channel, ""))
        if shard is not None:
            shard.drop(channel)

    def _assign(self, channel: str) -> None:
        """Put `channel` on the shard that serves its slot now (if the slot map knows it)."""
        nodes = self._redis.nodes_manager.slots_cache.get(key_slot(channel.encode()))
        shard = self._shards.get(nodes[0].name) if nodes else None
        if shard is None:
            self._topology_changed()  # not read yet, or a new master: `_reroute` comes back
            return
        old = self._owner.get(channel)
        if old == shard.name and channel in shard.channels:
            return
        if old is not None and old != shard.name and old in self._shards:
            self._shards[old].drop(channel)
        self._owner[channel] = shard.name
        shard.add(channel)

    def _channel_lost(self, channel: str) -> None:
        """`channel` is no longer heard (its connection failed, or its slot moved)."""
        live = self._live.get(channel)
        if live is not None and live.done():
            self._lost.add(channel)

    def _confirmed(self, channels: list[str], *, back: bool = False) -> None:
        """A shard confirmed `channels`: a first confirmation makes a socket live; one after a
        loss makes its session's sockets re-read the log. `back`: the shard's connection is
        back after a failure (the epoch is checked then, as on one Redis)."""
        sessions = []
        for channel in channels:
            live = self._live.get(channel)
            if live is not None and not live.done():
                live.set_result(None)
            elif channel in self._lost:
                self._lost.discard(channel)
                session = self._channels.get(channel)
                if session is not None:
                    sessions.append(session)
        if sessions or back:
            self._chore(self._resync(sessions))

    def _chore(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _resync(self, sessions: list[str]) -> None:
        """Sessions heard again after a loss: check the epoch, join them again (the shard may
        have lost their `subs` sets), then their sockets re-read the log."""
        self.reconnects += 1  # a link to the other instances is back
        with suppress(BrokerUnavailable):
            await self._check_epoch()
        backoff = RECONNECT_BACKOFF_S[0]
        while True:
            sessions = [session for session in sessions if session in self._local]
            try:
                await asyncio.gather(*(self._join(session) for session in sessions))
                break
            except BrokerUnavailable as exc:
                log.warning("could not join %d sessions again (%s); retrying", len(sessions), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_S[1])
        self._signal_local(RESYNC, sessions)

    def _shard_back(self, shard: _Shard) -> None:
        log.info("redis shard %s pub/sub back; its sessions resync", shard.name)

    def _message(self, channel: str, data: str) -> None:
        if self._channels.get(channel, "") is None:  # the control channel
            self._control(data)
        else:
            session, _, frame = data.partition(" ")
            self._received(session, frame)

    def _canary_channel(self, shard: str) -> str:
        """A channel of this instance in a slot of `shard` (by the slot map as last read)."""
        slots = self._redis.nodes_manager.slots_cache
        for n in range(4 * REDIS_CLUSTER_HASH_SLOTS):
            channel = f"{PREFIX}:{{k:{self._instance}:{n}}}"
            nodes = slots.get(key_slot(channel.encode()))
            if nodes and nodes[0].name == shard:
                return channel
        raise RedisConnectionError(f"{shard} serves no slot")

    async def _canary_forever(self) -> None:
        """Publish to every shard's canary channel: each connection's deadline catches it going
        deaf. And check the epoch, so an instance that writes nothing learns of lost data."""
        while True:
            await asyncio.sleep(self._settings.redis_canary_interval_s)
            message = json.dumps({"canary": time.time()})
            await asyncio.gather(
                *(
                    self._batched(self._publish, (shard.canary,), [message])
                    for shard in list(self._shards.values())
                    if shard.listening
                ),
                return_exceptions=True,
            )
            with suppress(BrokerUnavailable):
                await self._check_epoch()


class _Shard:
    """This process's pub/sub connection to one master: the sharded channels of this instance
    that its slots serve, and a canary channel of its own. Restarted with backoff whenever it
    fails, or its canary is overdue."""

    def __init__(self, broker: RedisClusterBroker, node: ClusterNode) -> None:
        self.broker = broker
        self.node = node
        self.name: str = node.name
        self.channels: set[str] = set()  # to hear here
        self.confirmed: set[str] = set()  # confirmed on the current connection
        self.canary = ""
        self.listening = False
        self.listened = False
        self.last_canary = time.monotonic()
        self._writer: asyncio.StreamWriter | None = None
        self._sent: deque[tuple[str, str]] = deque()  # (kind, channel) not yet answered
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"shard {self.name}")

    def add(self, channel: str) -> None:
        self.channels.add(channel)
        self._send("ssubscribe", channel)

    def drop(self, channel: str) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            if channel in self.confirmed:
                self.confirmed.discard(channel)
                self.broker._channel_lost(channel)
            self._send("sunsubscribe", channel)

    def _send(self, kind: str, channel: str) -> None:
        """Write the command now if connected (else the connection sends it when made)."""
        if self._writer is None:
            return
        try:
            self._writer.write(pack_command((kind.upper(), channel)))
        except (RuntimeError, OSError):  # closing: the read loop finds out and reconnects
            return
        self._sent.append((kind, channel))

    async def _run(self) -> None:
        settings = self.broker._settings
        backoff = RECONNECT_BACKOFF_S[0]
        failures = 0
        while True:
            conn = self.node.connection_class(**self.node.connection_kwargs)
            try:
                await self._listen(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc
                if self.listening:
                    failures, backoff = 0, RECONNECT_BACKOFF_S[0]
                failures += 1
                level = logging.WARNING if failures % 60 == 1 else logging.DEBUG
                log.log(level, "redis shard %s pub/sub down (%s); reconnecting", self.name, exc)
            finally:
                self._writer = None
                self.listening = False
                for channel in self.confirmed:
                    self.broker._channel_lost(channel)
                self.confirmed.clear()
                with suppress(Exception):
                    await asyncio.wait_for(conn.disconnect(), settings.redis_timeout_s)
            self.broker._topology_changed()  # this master may have failed, or moved slots
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_BACKOFF_S[1])

    async def _listen(self, conn: Any) -> None:
        settings = self.broker._settings
        async with asyncio.timeout(settings.redis_timeout_s):
            await conn.connect()
        reader, writer = streams(conn)
        if reader is None or writer is None:
            raise RedisConnectionError("the pub/sub connection closed")
        parser = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self.canary = self.broker._canary_channel(self.name)
        self._sent.clear()
        self._writer = writer
        for channel in list(self.channels):
            self._send("ssubscribe", channel)
        # The canary goes last: Redis answers in order, so its confirmation means every
        # channel before it is answered too.
        self._send("ssubscribe", self.canary)
        confirm_by = time.monotonic() + settings.redis_timeout_s
        deadline_s = self.broker._canary_deadline_s
        while True:
            message: Any = None
            with suppress(TimeoutError):
                async with asyncio.timeout(settings.redis_canary_interval_s):
                    message = await _read(reader, parser)
            if self.listening:
                if time.monotonic() - self.last_canary > deadline_s:
                    raise RedisConnectionError("canary overdue: the subscription went deaf")
            elif time.monotonic() > confirm_by:
                raise RedisConnectionError("the shard did not confirm the subscriptions in time")
            if message is not None:
                self._handle(message)

    def _handle(self, message: Any) -> None:
        if isinstance(message, ResponseError):  # refused: its slot is not (or no longer) here
            kind, channel = self._sent.popleft() if self._sent else ("", "")
            log.info("redis shard %s refused %s %s: %s", self.name, kind, channel, message)
            if channel == self.canary:
                raise RedisConnectionError("the canary's slot moved")
            self.channels.discard(channel)
            self.broker._topology_changed()
            return
        kind, channel, data = message[0], message[1], message[2]
        if kind == "smessage":
            if channel == self.canary:
                self.last_canary = time.monotonic()
                with suppress(ValueError, TypeError, AttributeError):
                    metrics.canary_received(json.loads(data).get("canary"))
            else:
                self.broker._message(channel, data)
            return
        answered = bool(self._sent) and self._sent[0] == (kind, channel)
        if answered:
            self._sent.popleft()
        if kind == "ssubscribe":
            if channel == self.canary:
                self._listening()
            elif channel in self.channels:
                self.confirmed.add(channel)
                if self.listening:
                    self.broker._confirmed([channel])
        elif kind == "sunsubscribe" and not answered:
            # Redis unsubscribes the channels of a slot that moved away (or of a master that
            # became a replica): hear them where they went.
            if channel == self.canary:
                raise RedisConnectionError("the canary's slot moved")
            if channel in self.channels:
                self.channels.discard(channel)
                self.confirmed.discard(channel)
                self.broker._channel_lost(channel)
                self.broker._topology_changed()

    def _listening(self) -> None:
        self.listening = True
        self.last_canary = time.monotonic()
        if self.listened:
            self.broker._shard_back(self)
        back, self.listened = self.listened, True
        self.broker._confirmed(list(self.confirmed), back=back)


async def _read(reader: asyncio.StreamReader, parser: Any) -> Any:
    """The next reply or message on a pub/sub connection."""
    while True:
        reply = parser.gets()
        if reply is not False:  # hiredis: False until a whole reply is buffered
            return reply
        chunk = await reader.read(READ_SIZE)
        if not chunk:
            raise RedisConnectionError("redis closed the connection")
        parser.feed(chunk)


if TYPE_CHECKING:  # mypy checks that it plays every role of a broker
    _: type[Broker] = RedisClusterBroker
