"""Chaos: Redis dies under a busy cluster, and comes back with its data, then without it.

Two instances (default Redis timeouts and lease) behind the shipped HAProxy config; 50 sessions
chat without pause through the fake upstream. Redis is killed (-9) for 20 s, longer than every
timeout, and started again from its append-only file (`appendfsync always`: nothing lost); later
it is killed and started empty. Every client must end each reply it saw begin with the exact
upstream text, or explicitly (`done interrupted`, `session_expired`): never a hole, a duplicate or
a hang. Both instances must be ready within 10 s of Redis's return, with no process restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import websockets

from chatbot.fake_openai import reply_text

from ..support.procs import (
    ChatbotProcess,
    FakeOpenAIProcess,
    HAProxyProcess,
    RedisProcess,
    free_port,
)
from ..support.waiting import readiness, wait_ready, wait_until

pytestmark = pytest.mark.cluster

SESSIONS = 50
CHUNKS = 20  # a reply of 20 pieces, 100 ms apart: about 2 s
OUTAGE_S = 20.0
BACK_WITHIN_S = 10.0
SILENCE_S = 45.0  # no frame for this long on a socket with a reply open: a hang
RECEIVE_S = 1.0


class Chatter:
    """One user: a session through the balancer, one message after another, resuming after
    every drop with `session`, `after` and `epoch`, checking every frame it is sent."""

    def __init__(self, n: int, url: str, phase: list[str]) -> None:
        self.n = n
        self.url = url
        self.phase = phase  # the test's current phase, shared: phase[0]
        self.session: str | None = None
        self.last = 0
        self.epoch: str | None = None
        self.expected: dict[str, str] = {}  # message id -> the upstream's reply text
        self.pieces: dict[str, list[str]] = {}  # reply_to -> delta texts, this epoch
        self.ended: set[str] = set()
        self.accepted: set[str] = set()  # messages whose `user` event this user saw
        self.connects = 0  # sockets opened (`ready` received)
        self.open: str | None = None  # the message whose reply this user waits for
        self.sent = 0
        self.quiet_until = 0.0  # after a refusal, wait a little before sending again
        self.exact: Counter[str] = Counter()  # whole replies, by phase
        self.seen: Counter[str] = Counter()  # interrupted, session_expired, resync, ...
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(f"chatter {self.n} ({self.phase[0]}): {text}")

    async def run(self, stop: asyncio.Event) -> None:
        while not (stop.is_set() and self.open is None):
            try:
                async with asyncio.timeout(10):
                    ws = await websockets.connect(self._url(), open_timeout=5)
            except (OSError, TimeoutError, websockets.InvalidHandshake):
                await asyncio.sleep(0.5)  # the balancer has no instance ready (503), or Redis
                continue
            try:
                await self._converse(ws, stop)
            except websockets.ConnectionClosed as exc:
                self.seen[f"closed {exc.rcvd.code if exc.rcvd else None}"] += 1
            finally:
                async with asyncio.timeout(5):
                    await ws.close()
            if self.problems:
                return

    def _url(self) -> str:
        if self.session is None:
            return self.url
        query = f"session={self.session}&after={self.last}"
        return f"{self.url}?{query}" + (f"&epoch={self.epoch}" if self.epoch else "")

    async def _converse(self, ws: Any, stop: asyncio.Event) -> None:
        ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if ready["type"] != "ready":
            return self.problem(f"first frame {ready}")
        if ready["session"] != self.session:
            if self.session is not None:  # gone with the data while this user was away
                self.seen["new session"] += 1
                self._lose_open()
            self.session, self.last, self.pieces = ready["session"], ready["seq"], {}
        elif self.epoch is not None and ready["epoch"] != self.epoch:
            self.seen["new epoch at resume"] += 1
            self.last, self.pieces = 0, {}
        self.epoch = ready["epoch"]
        self.connects += 1
        silent_since = time.monotonic()
        while not (stop.is_set() and self.open is None):
            if self.open is None and time.monotonic() >= self.quiet_until:
                try:
                    await self._say(ws)
                except websockets.ConnectionClosed:
                    self.open = None  # not sent; what the server sent first is read below
            try:
                frame = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_S))
            except TimeoutError:
                if time.monotonic() - silent_since > SILENCE_S:
                    state = (
                        "accepted" if self.open in self.accepted else "never accepted nor refused"
                    )
                    return self.problem(
                        f"no frame for {SILENCE_S} s with reply {self.open} open ({state}; "
                        f"session {self.session}, seq {self.last}, socket {self.connects}, "
                        f"seen {dict(self.seen)})"
                    )
                continue
            silent_since = time.monotonic()
            if not self._take(frame):
                return

    async def _say(self, ws: Any) -> None:
        msg_id = f"c{self.n}-{self.sent}"
        text = f"chaos {self.n} message {self.sent}"
        self.sent += 1
        self.expected[msg_id] = reply_text(text, CHUNKS)
        self.open = msg_id
        await ws.send(json.dumps({"type": "message", "id": msg_id, "text": text}))

    def _take(self, frame: dict[str, Any]) -> bool:
        """Check and apply one frame; False when this socket is done (the session expired)."""
        kind = frame["type"]
        seq = None if kind == "resync" else frame.get("seq")  # resync's seq is the log's end
        if seq is not None:
            if seq != self.last + 1:  # the server promises no gap and no duplicate per socket
                self.problem(f"seq {seq} after {self.last}: {frame}")
                return False
            self.last = seq
        if kind == "user":
            self.accepted.add(frame["id"])
        elif kind == "delta":
            self.pieces.setdefault(frame["reply_to"], []).append(frame["text"])
        elif kind == "done":
            self._end(frame["reply_to"], frame["reason"])
        elif kind == "resync":
            self.seen["resync"] += 1
            self.last, self.pieces, self.epoch = 0, {}, frame["epoch"]
        elif kind == "error" and seq is None:
            self.seen[frame["code"]] += 1
            if frame["code"] == "session_expired":
                self._lose_open()
                self.session = None
                return False
            if frame.get("id") == self.open:  # refused: nothing was stored (docs/protocol.md)
                if frame["code"] not in ("unavailable", "busy"):  # no other refusal is due here
                    self.problem(f"message {self.open} refused: {frame}")
                self.open = None  # a new message soon
                self.quiet_until = time.monotonic() + 0.5
        return True

    def _end(self, reply_to: str, reason: str) -> None:
        if reply_to in self.ended:  # replayed after a resync
            return
        expected = self.expected.get(reply_to)
        text = "".join(self.pieces.get(reply_to, []))
        if expected is None:
            self.problem(f"a reply to a message never sent: {reply_to}")
        elif reason == "stop":
            if text == expected:
                self.exact[self.phase[0]] += 1
            else:
                self.problem(f"reply {reply_to} ended 'stop' with {text!r}, not {expected!r}")
        elif reason == "interrupted":
            self.seen["interrupted"] += 1
            if not expected.startswith(text):
                self.problem(f"interrupted reply {reply_to} has a hole: {text!r}")
        else:
            self.problem(f"reply {reply_to} ended {reason!r}")
        self.ended.add(reply_to)
        if reply_to == self.open:
            self.open = None

    def _lose_open(self) -> None:
        if self.open is not None:
            self.ended.add(self.open)
            self.open = None


@pytest.fixture
def cluster() -> Iterator[tuple[RedisProcess, list[ChatbotProcess], HAProxyProcess]]:
    redis = RedisProcess(durable=True).start()
    fake = FakeOpenAIProcess("--ttft-ms", "50", "--chunks", str(CHUNKS), "--interval-ms", "100")
    fake.start()
    env = {
        "REDIS_URL": redis.url,
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-chaos-test",
        "RATE_LIMIT_IP": "100000/minute",
        "RATE_LIMIT_SESSION": "1000/minute",
        "RATE_LIMIT_NEW_SESSIONS": "1000/minute",
        "MAX_SOCKETS_PER_IP": "100000",
        # 50 chatters from one address, ~25 on each instance, reconnecting through the outage.
        "MAX_REPLIES_PER_IP": "1000",
        "RATE_LIMIT_HANDSHAKES_IP": "100000/minute",
        "IP_TOKEN_BUDGET": "1000000000/day",
        "LOG_LEVEL": "INFO",  # what `explain` prints when a socket hangs
    }
    instances = [ChatbotProcess(env, name=f"chatbot-{n}").start() for n in (1, 2)]
    # The shipped config has three server slots: the third points at a closed port, and the
    # health checks keep it out of rotation, as with an instance that is down.
    lb = HAProxyProcess([*(i.port for i in instances), free_port()]).start()
    yield redis, instances, lb
    for process in (lb, *instances, fake, redis):
        process.stop()


async def test_chaos_redis_killed_for_20_s_then_restarted_empty(
    cluster: tuple[RedisProcess, list[ChatbotProcess], HAProxyProcess],
) -> None:
    redis, instances, lb = cluster
    pids = [i.pid for i in instances]
    await wait_ready(instances, 20)
    phase = ["before"]
    stop = asyncio.Event()
    chatters = [Chatter(n, lb.ws_url, phase) for n in range(SESSIONS)]
    running = [asyncio.ensure_future(c.run(stop)) for c in chatters]

    async def every_chatter_whole_in(name: str, timeout_s: float) -> None:
        async def done() -> bool:
            problems = [p for c in chatters for p in c.problems]
            assert not problems, problems
            return all(c.exact[name] for c in chatters)

        try:
            await wait_until(done, timeout_s)
        except AssertionError:
            await explain(redis, instances, chatters)
            raise
        except TimeoutError:
            lagging = {c.n: (c.open, dict(c.seen)) for c in chatters if not c.exact[name]}
            raise AssertionError(f"no whole reply in phase {name!r}: {lagging}") from None

    try:
        await every_chatter_whole_in("before", 30)

        redis.kill()  # -9; its append-only file keeps every write it acknowledged
        phase[0] = "outage"
        killed = time.monotonic()
        for instance in instances:
            await wait_until(lambda i=instance: unready(i), 15)
        await asyncio.sleep(OUTAGE_S - (time.monotonic() - killed))
        redis.start()
        phase[0] = "after restart"
        back_s = await wait_ready(instances, BACK_WITHIN_S)
        await every_chatter_whole_in("after restart", 45)
        assert not any(c.seen["resync"] for c in chatters)  # nothing was lost: same epoch

        redis.kill()
        shutil.rmtree(redis.dir)  # restarted empty: its data is gone
        os.mkdir(redis.dir)
        redis.start()
        phase[0] = "after empty restart"
        empty_back_s = await wait_ready(instances, BACK_WITHIN_S)
        await every_chatter_whole_in("after empty restart", 45)
    finally:
        stop.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*running, return_exceptions=True)
    for task in running:
        task.result()  # no chatter crashed
    problems = [p for c in chatters for p in c.problems]
    assert not problems, problems
    hung = [(c.n, c.open) for c in chatters if c.open is not None]
    assert not hung, hung
    assert [i.pid for i in instances] == pids and all(i.proc.poll() is None for i in instances)  # type: ignore[union-attr]
    seen = sum((c.seen for c in chatters), Counter())
    assert seen["session_expired"] + seen["new session"] == SESSIONS, seen
    print(f"\nchaos: ready {back_s:.1f} s after Redis's return, {empty_back_s:.1f} s when empty")
    print(f"chaos: whole replies {sum((c.exact for c in chatters), Counter())}, seen {seen}")


async def explain(
    redis: RedisProcess, instances: list[ChatbotProcess], chatters: list[Chatter]
) -> None:
    """Print, for each user with a problem, what Redis holds of its session (its lease and the
    end of its log) and what the instances logged about it: a hang found once under load must
    say where it stopped."""
    async with aioredis.from_url(redis.url, decode_responses=True) as admin:
        for chatter in chatters:
            if not chatter.problems or chatter.session is None:
                continue
            session = chatter.session
            lease = await admin.hget("chatbot:lease", session)
            due = await admin.zscore("chatbot:lease:due", session)
            (now_s, now_us) = await admin.time()
            tail = await admin.xrevrange(f"chatbot:s:{session}:log", count=6)
            now_ms = now_s * 1000 + now_us // 1000
            print(f"\n{chatter.problems[0]}\n  lease {lease!r} due {due} (now {now_ms})")
            for _, fields in reversed(tail):
                print(f"  log {fields['f'][:160]}")
            for instance in instances:
                for line in instance.output().splitlines():
                    if session[:6] in line:
                        print(f"  {instance.name}: {line[:300]}")


async def unready(instance: ChatbotProcess) -> bool:
    return (await readiness(instance))["http_status"] == 503
