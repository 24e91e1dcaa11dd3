"""The Redis broker: shared sessions, a replayable event log, leases and fan-out between instances.

Connection budget per process: one pub/sub connection (whatever the number of sockets; the local
`Hub` fans out) plus a small blocking pool for commands (`REDIS_MAX_CONNECTIONS` in all).

Key layout (docs/scaling.md has the full story):

    chatbot:s:{session}:meta   hash   seq (last seq); refreshed TTL on every event
    chatbot:s:{session}:log    stream entry id "{seq}-0", field f = the frame; MAXLEN ~ N
    chatbot:s:{session}:hist   list   model context turns (JSON), trimmed to 2 x HISTORY_TURNS
    chatbot:lease              hash   session -> "owner|msg_id|token" of the generating instance
    chatbot:lease:due          zset   session -> lease deadline (ms, Redis clock)
    chatbot:task:{task}        string the HTTP ask API's task record (JSON), with a TTL
    channel chatbot:s:{session}       live events of a session (the logged frames)
    channel chatbot:i:{instance}      control messages for one instance (stop, canary)

Every multi-step change is one Lua script, so seq order, log order and publish order agree, and
clocks of different machines never matter (leases use Redis's TIME).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from .. import metrics
from ..errors import BrokerUnavailable
from ..protocol import encode, new_id
from ..settings import Settings
from .base import SUBSCRIPTION_MAX_BYTES, ControlHandler, Event, Hub, Lease, Subscription

log = logging.getLogger(__name__)

PREFIX: Final = "chatbot"
LEASES: Final = f"{PREFIX}:lease"
LEASE_DUE: Final = f"{PREFIX}:lease:due"
SUBSCRIBE_TIMEOUT_S: Final = 5.0
CLOSE_TIMEOUT_S: Final = 2.0
RECONNECT_BACKOFF_S: Final = (0.1, 5.0)  # first and longest wait between listener restarts

# Appends one event: next seq, log entry, publish, TTL refresh. ARGV[1] and ARGV[2] are the frame's
# JSON before and after the seq value, so the frame is built without decoding JSON in Lua. ARGV[6]
# is the event's idempotency key ('' for none): the same key as the last append returns that
# append's seq and does nothing (a retry of a call whose answer was lost).
_APPEND = """
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'key') == ARGV[6] then
  return tonumber(redis.call('HGET', KEYS[1], 'seq'))
end
redis.call('HSET', KEYS[1], 'key', ARGV[6])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local frame = ARGV[1] .. seq .. ARGV[2]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'f', frame)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('PUBLISH', ARGV[5], frame)
return seq
"""

# The same, but only while ARGV[7] (a lease) still holds the session; releases it. (So a retried
# finish never appends twice: the first one released the lease.)
_FINISH = (
    """
if redis.call('HGET', KEYS[4], ARGV[8]) ~= ARGV[7] then return 0 end
redis.call('HDEL', KEYS[4], ARGV[8])
redis.call('ZREM', KEYS[5], ARGV[8])
"""
    + _APPEND
)

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A lease whose deadline passed is dead but still blocks the session until an instance claims it
# and closes the orphaned reply; so a new message never slips in before that reply's `done`.
_ACQUIRE = (
    """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
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


_CREATE = """
redis.call('HSET', KEYS[1], 'seq', 0)
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""

# One history turn, atomically: append, keep the last ARGV[2] (negative), refresh the TTL.
_ADD_TURN = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], ARGV[2], -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
"""

_ADJUST = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return value
"""


def _session_keys(session: str) -> tuple[str, str, str]:
    base = f"{PREFIX}:s:{session}"
    return f"{base}:meta", f"{base}:log", f"{base}:hist"


def _session_channel(session: str) -> str:
    return f"{PREFIX}:s:{session}"


def _instance_channel(instance: str) -> str:
    return f"{PREFIX}:i:{instance}"


def _lease_text(lease: Lease) -> str:
    return f"{lease.owner}|{lease.msg_id}|{lease.token}"


def _lease_of(text: str) -> Lease:
    # Owner and token are ours (no "|"); the message id is the client's and may hold anything.
    owner, rest = text.split("|", 1)
    msg_id, token = rest.rsplit("|", 1)
    return Lease(owner=owner, msg_id=msg_id, token=token)


def _frame_parts(event: dict[str, Any]) -> tuple[str, str]:
    """Split the frame's JSON around its seq: '{"type":"delta","seq":' and ',"reply_to":...}'."""
    head = '{"type":' + json.dumps(event["type"]) + ',"seq":'
    rest = {k: v for k, v in event.items() if k != "type"}
    tail = encode(rest)
    return head, ("," + tail[1:]) if len(tail) > 2 else "}"


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@contextmanager
def _unavailable(action: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        if _cancelling():
            # redis-py turns a cancellation mid-command into a connection error; a caller that
            # retries BrokerUnavailable would then never see that its task was cancelled.
            raise asyncio.CancelledError from exc
        raise BrokerUnavailable(f"redis unavailable while {action}: {type(exc).__name__}") from exc


class RedisBroker:
    kind = "redis"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # Public: the rate limiter's storage shares it, so it costs no extra connections.
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
        self._redis = aioredis.Redis(connection_pool=self.pool)
        self._append = self._redis.register_script(_APPEND)
        self._finish = self._redis.register_script(_FINISH)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._claim = self._redis.register_script(_CLAIM)
        self._adjust = self._redis.register_script(_ADJUST)
        self._create = self._redis.register_script(_CREATE)
        self._add_turn = self._redis.register_script(_ADD_TURN)
        self._batch: list[tuple[Any, int, list[Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._hub = Hub()
        self._instance = ""
        self._on_control: ControlHandler = lambda message: None
        self._pubsub: Any = None
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._listening = False
        self._listened = False  # has listened at least once
        self._backoff_s = RECONNECT_BACKOFF_S[0]
        self._last_canary = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self.reconnects = 0

    # Lifecycle, listener supervision and health.

    async def start(self, instance: str, on_control: ControlHandler) -> None:
        self._instance = instance
        self._on_control = on_control
        for loop in (self._listen_forever(), self._canary_forever()):
            task = asyncio.create_task(loop)
            self._tasks.add(task)

    async def close(self) -> None:
        if self._flusher is not None:
            self._tasks.add(self._flusher)
        for task in self._tasks:
            task.cancel()
        # Bounded: a shutdown must never hang on a connection attempt that ignores cancellation.
        _, stuck = await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT_S)
        if stuck:
            log.warning("redis broker closed with %d task(s) still stopping", len(stuck))
        if self._pubsub is not None:
            with suppress(Exception):
                await self._pubsub.aclose()
        await self._redis.aclose()
        await self.pool.disconnect()

    async def check(self) -> dict[str, Any]:
        canary_age_s = round(time.monotonic() - self._last_canary, 3)
        try:
            async with asyncio.timeout(self._settings.redis_timeout_s):
                await self._redis.ping()
            reachable = True
        except (RedisError, OSError, TimeoutError):
            reachable = False
        return {
            "ok": reachable and self._listening and canary_age_s < self._canary_deadline_s,
            "backend": self.kind,
            "reachable": reachable,
            "listening": self._listening,
            "canary_age_s": canary_age_s,
            "reconnects": self.reconnects,
            "local_subscriptions": len(self._hub),
        }

    @property
    def _canary_deadline_s(self) -> float:
        return 3 * self._settings.redis_canary_interval_s + self._settings.redis_timeout_s

    async def _listen_forever(self) -> None:
        """The one pub/sub connection of this process, restarted with backoff whenever it fails.

        redis-py reconnects a PubSub itself only for a few quick retries, then the listener dies;
        so every failure here ends in a fresh PubSub that re-subscribes every channel local
        sockets need, after which every local subscription re-reads the log (RESYNC) to recover
        what was published while it was deaf.
        """
        while True:
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _cancelling():
                    raise asyncio.CancelledError from exc  # the client library swallowed it
                if self._listening:
                    log.warning("redis pub/sub listener lost (%s); reconnecting", exc)
                self._listening = False
                await asyncio.sleep(self._backoff_s)
                self._backoff_s = min(self._backoff_s * 2, RECONNECT_BACKOFF_S[1])

    async def _listen_once(self) -> None:
        if self._pubsub is not None:
            with suppress(Exception):
                await self._pubsub.aclose()
        pubsub = self._pubsub = self._redis.pubsub()
        control = _instance_channel(self._instance)
        # The control channel goes last: Redis answers in order, so its confirmation means every
        # session channel before it is live, and the resync below cannot miss anything.
        channels = [_session_channel(s) for s in self._hub.sessions()] + [control]
        await pubsub.subscribe(*channels)
        while True:
            message = await pubsub.get_message(timeout=self._settings.redis_canary_interval_s)
            if time.monotonic() - self._last_canary > self._canary_deadline_s:
                raise ConnectionError("canary overdue: the subscription went deaf")
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == "message":
                if channel == control:
                    self._control(message["data"])
                else:
                    self._dispatch(channel, message["data"])
            elif kind == "subscribe":
                future = self._subscribed.get(channel)
                if future is not None and not future.done():
                    future.set_result(None)
                if channel == control:
                    await self._on_listening(pubsub, channels)

    async def _on_listening(self, pubsub: Any, subscribed: list[str]) -> None:
        if self._listened:
            self.reconnects += 1
            log.info("redis pub/sub listener back; resyncing local sockets")
        self._listened = self._listening = True
        self._backoff_s = RECONNECT_BACKOFF_S[0]
        self._last_canary = time.monotonic()
        # Sockets that arrived while the listener was (re)starting are not in `subscribed`.
        late = [c for c, f in self._subscribed.items() if not f.done() and c not in subscribed]
        if late:
            await pubsub.subscribe(*late)
        self._hub.resync_all()

    def _dispatch(self, channel: str, frame: str) -> None:
        session = channel[len(PREFIX) + 3 :]
        try:
            data = json.loads(frame)
        except ValueError:
            log.error("ignored a malformed frame on %s…", channel[:16])
            return
        # Logged events carry a seq; transient frames (announce) are passed on as they are.
        seq = data.get("seq") if isinstance(data, dict) else None
        self._hub.dispatch(session, frame if seq is None else Event(seq, data, frame))

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
        """Publish to ourselves; the listener's deadline catches a subscription gone deaf."""
        channel = _instance_channel(self._instance)
        while True:
            await asyncio.sleep(self._settings.redis_canary_interval_s)
            with suppress(RedisError, OSError):
                await self._redis.publish(channel, json.dumps({"canary": time.time()}))

    # Sessions and their event log.

    async def create_session(self, session: str) -> None:
        meta, _, _ = _session_keys(session)
        with _unavailable("creating a session"):
            await self._batched(self._create, (meta,), [self._settings.session_ttl_s])

    async def last_seq(self, session: str) -> int | None:
        meta, _, _ = _session_keys(session)
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
            _session_channel(session),
            key or "",
        ]

    async def append(self, session: str, event: dict[str, Any], key: str | None = None) -> Event:
        args = self._event_args(session, event, key)
        with _unavailable("appending an event"):
            seq = int(await self._batched(self._append, _session_keys(session), args))
        frame = args[0] + str(seq) + args[1]
        return Event(seq=seq, data={"type": event["type"], "seq": seq, **event}, frame=frame)

    def _batched(self, script: Any, keys: Sequence[str], args: list[Any]) -> asyncio.Future[Any]:
        """Run a script in the next batch: the calls of every socket and reply of this process
        (a token's append, a lease renewal, a history read) that arrive while the previous
        batch is in flight go together as one pipeline, one connection and one round trip,
        instead of a pool checkout and a round trip each. Calls run in the order made; a
        reply awaits each of its appends, so a session's events keep their order."""
        return self._enqueue((script, len(keys), [*keys, *args]))

    def _command(self, *argv: Any) -> asyncio.Future[Any]:
        """A plain command (`HGET`, `LRANGE`, `PUBLISH`...) in the next batch."""
        return self._enqueue((None, 0, list(argv)))

    def _enqueue(self, call: tuple[Any, int, list[Any]]) -> asyncio.Future[Any]:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._batch.append((*call, done))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_batches())
        return done

    async def _flush_batches(self) -> None:
        batch: list[tuple[Any, int, list[Any], asyncio.Future[Any]]] = []
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                try:
                    results = await self._run_batch([call[:3] for call in batch])
                except Exception as exc:  # every caller hears of it, as if it ran alone
                    results = [exc] * len(batch)
                for (*_, done), result in zip(batch, results, strict=True):
                    if done.done():  # its caller was cancelled
                        continue
                    if isinstance(result, BaseException):
                        done.set_exception(result)
                    else:
                        done.set_result(result)
        finally:
            self._flusher = None
            for *_, done in [*batch, *self._batch]:  # closing: nobody waits forever
                if not done.done():
                    done.set_exception(ConnectionError("the broker is closing"))

    async def _run_batch(self, batch: list[tuple[Any, int, list[Any]]]) -> list[Any]:
        """Send the calls as one pipeline, in order: `EVALSHA` for a script, the command itself
        otherwise. When Redis lost a script (a restart) it refuses those calls, which therefore
        did not run: load the scripts and run them again."""
        results: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        for attempt in range(2):
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    script, numkeys, argv = batch[i]
                    if script is None:
                        pipe.execute_command(*argv)
                    else:
                        pipe.evalsha(script.sha, numkeys, *argv)
                answers = await pipe.execute(raise_on_error=False)
            for i, answer in zip(todo, answers, strict=True):
                results[i] = answer
            todo = [i for i in todo if isinstance(results[i], NoScriptError)]
            if not todo or attempt:
                return results
            for script in {batch[i][0] for i in todo}:
                await self._redis.script_load(script.script)
        return results

    async def finish(self, session: str, event: dict[str, Any], lease: Lease) -> bool:
        keys = [*_session_keys(session), LEASES, LEASE_DUE]
        args = [*self._event_args(session, event, None), _lease_text(lease), session]
        with _unavailable("finishing a reply"):
            return bool(await self._batched(self._finish, keys, args))

    async def replay(self, session: str, after: int) -> list[Event]:
        _, stream, _ = _session_keys(session)
        with _unavailable("replaying a session"):
            entries = await self._redis.xrange(stream, min=f"({after}-0", max="+")
        return [Event.from_frame(fields["f"]) for _, fields in entries]

    @asynccontextmanager
    async def subscribe(
        self, session: str, max_bytes: int = SUBSCRIPTION_MAX_BYTES
    ) -> AsyncIterator[Subscription]:
        sub = Subscription(session, max_bytes)
        channel = _session_channel(session)
        if self._hub.add(sub):
            self._subscribed[channel] = asyncio.get_running_loop().create_future()
            if self._listening and self._pubsub is not None:
                with suppress(RedisError, OSError):  # the listener re-subscribes on recovery
                    await self._pubsub.subscribe(channel)
        try:
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                    await asyncio.shield(self._subscribed[channel])
            except TimeoutError:
                raise BrokerUnavailable("redis did not confirm a subscription") from None
            yield sub
        finally:
            if self._hub.remove(sub):
                self._subscribed.pop(channel, None)
                if self._listening and self._pubsub is not None:
                    with suppress(RedisError, OSError):
                        await self._pubsub.unsubscribe(channel)

    async def announce(self, session: str, frame: dict[str, Any]) -> None:
        with _unavailable("announcing to a session"):
            await self._command("PUBLISH", _session_channel(session), encode(frame))

    async def signal(self, instance: str, message: dict[str, Any]) -> None:
        with _unavailable("sending a control message"):
            await self._command("PUBLISH", _instance_channel(instance), json.dumps(message))

    # Model context.

    async def history(self, session: str) -> list[dict[str, str]]:
        _, _, hist = _session_keys(session)
        with _unavailable("reading history"):
            turns = await self._command("LRANGE", hist, 0, -1)
        return [json.loads(turn) for turn in turns]

    async def add_turn(self, session: str, role: str, content: str) -> None:
        _, _, hist = _session_keys(session)
        turn = json.dumps({"role": role, "content": content})
        args = [turn, -2 * self._settings.history_turns, self._settings.session_ttl_s]
        with _unavailable("adding to history"):
            await self._batched(self._add_turn, (hist,), args)

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
        args = [claimant, new_id() + "-", int(ttl_s * 1000)]
        with _unavailable("claiming orphaned leases"):
            flat = await self._claim(keys=[LEASES, LEASE_DUE], args=args)
        return [(flat[i], _lease_of(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def adjust(self, key: str, delta: int, ttl_s: int) -> int:
        with _unavailable("adjusting a counter"):
            return int(await self._batched(self._adjust, (key,), [delta, ttl_s]))

    # Tasks of the HTTP ask API.

    async def put_task(self, task: str, record: dict[str, Any]) -> None:
        with _unavailable("storing a task"):
            await self._redis.set(
                f"{PREFIX}:task:{task}", json.dumps(record), ex=self._settings.session_ttl_s
            )

    async def get_task(self, task: str) -> dict[str, Any] | None:
        with _unavailable("reading a task"):
            raw = await self._redis.get(f"{PREFIX}:task:{task}")
        return None if raw is None else json.loads(raw)  # type: ignore[no-any-return]
