"""A Redis Cluster shard fails over, and live sessions' slots move, while replies stream.

Two instances share a Redis Cluster of three masters and three replicas (node timeout 1 s).
Sessions are spread over all three shards, each with a socket on both instances, and every
session streams a reply when a master is killed (-9), or when the slots of some sessions move to
another master. Every reply must end with the exact upstream text or `done interrupted`, each
socket's seqs must stay contiguous (a `resync` starts them again), the sessions of the other
shards must not notice, and the sessions hit must serve new messages, on both instances, once
the cluster is whole again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from itertools import pairwise
from typing import Any

import pytest

from chatbot.fake_openai import parse_prompt, reply_text

from ..support.frames import Client, Frame, connect
from ..support.procs import ChatbotProcess, FakeOpenAIProcess, RedisClusterProcess
from ..support.waiting import wait_ready
from .conftest import instance_env

pytestmark = pytest.mark.cluster

LEASE_S = 5.0  # longer than a failover: a reply's steps retry through it
STREAM = "[[fake:chunks=80]] [[fake:interval_ms=50]]"  # a reply of about 4 s
LONGER = "[[fake:chunks=120]] [[fake:interval_ms=50]]"  # 6 s: three slots move meanwhile
FRAME_TIMEOUT_S = 20.0
PROMOTED_WITHIN_S = 10.0  # from the kill: a node timeout (1 s), the failure report, the election
# Deltas come every 50 ms: a socket of another shard that waited this long was disturbed
# (a failover takes 2 s or more).
UNDISTURBED_PAUSE_S = 1.5
SERVED_WITHIN_S = 5.0  # from the promotion: the whole reply to a message sent in the outage


def expected(message: str) -> str:
    prompt, options = parse_prompt(message)
    return reply_text(prompt, int(options.get("chunks") or 5))  # the server's default: 5


class Deployment:
    def __init__(self) -> None:
        self.redis = RedisClusterProcess()
        self.fake = FakeOpenAIProcess("--ttft-ms", "50", "--chunks", "5", "--interval-ms", "20")
        env = instance_env(self.redis.url, self.fake.base_url, LEASE_S) | {
            # Every socket comes from one address.
            "RATE_LIMIT_IP": "100000/minute",
            "RATE_LIMIT_HANDSHAKES_IP": "100000/minute",
            "RATE_LIMIT_NEW_SESSIONS": "1000/minute",
            "MAX_REPLIES_PER_IP": "1000",
            "IP_TOKEN_BUDGET": "1000000000/day",
        }
        self.instances = [ChatbotProcess(env, name=f"chatbot-{n}") for n in (1, 2)]

    def start(self) -> None:
        self.redis.start()
        self.fake.start()
        for instance in self.instances:
            instance.start()

    def stop(self) -> None:
        for process in (*self.instances, self.fake):
            process.stop()
        self.redis.stop()

    async def whole(self) -> None:
        """Every node running, the cluster healthy, both instances ready."""
        for node in self.redis.nodes:
            if not node.running:
                await asyncio.to_thread(self.redis.restart, node)
        await asyncio.to_thread(self.redis.wait_healthy)
        await wait_ready(self.instances, 20)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    deployment = Deployment()
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
async def whole(deployment: Deployment) -> Deployment:
    await deployment.whole()
    return deployment


class Tracked:
    """One socket, its frames checked as they come: seqs contiguous (from 1 again after a
    `resync`), every reply ended once, with the exact upstream text or `interrupted` after a
    prefix of it."""

    def __init__(self, client: Client, expected: dict[str, str]) -> None:
        self.client = client
        self.expected = expected  # message id -> the upstream's reply, shared by the session
        self.last: int = client.ready["seq"]
        self.pieces: dict[str, list[str]] = {}
        self.ended: dict[str, str] = {}  # message id -> `done` reason, or "refused <code>"
        self.seen: Counter[str] = Counter()
        self.problems: list[str] = []
        self.arrivals: dict[str, list[float]] = {}  # message id -> when its deltas came

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.client.session} on {self.client.server}: {text}")

    async def until(self, reached: Any, timeout_s: float = FRAME_TIMEOUT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not reached():
                self.take(await self.client.recv(FRAME_TIMEOUT_S))

    async def until_streaming(self, msg_id: str) -> None:
        await self.until(lambda: self.pieces.get(msg_id) or msg_id in self.ended)

    async def until_ended(self, msg_id: str, timeout_s: float = FRAME_TIMEOUT_S) -> str:
        await self.until(lambda: msg_id in self.ended, timeout_s)
        return self.ended[msg_id]

    def take(self, frame: Frame) -> None:
        kind = frame["type"]
        seq = None if kind == "resync" else frame.get("seq")  # resync's seq is the log's end
        if seq is not None:
            if seq != self.last + 1:
                self.problem(f"seq {seq} after {self.last}: {frame}")
            self.last = seq
        if kind == "delta":
            self.pieces.setdefault(frame["reply_to"], []).append(frame["text"])
            self.arrivals.setdefault(frame["reply_to"], []).append(time.monotonic())
        elif kind == "done":
            self.end(frame["reply_to"], frame["reason"])
        elif kind == "resync":
            self.seen["resync"] += 1
            self.last, self.pieces = 0, {}
        elif kind == "error" and frame.get("id") in self.expected:  # refused: nothing stored
            self.seen[frame["code"]] += 1
            self.ended.setdefault(frame["id"], f"refused {frame['code']}")
        elif kind == "error":
            self.problem(f"error {frame}")

    def end(self, reply_to: str, reason: str) -> None:
        if reply_to in self.ended:  # replayed after a resync
            return
        text = "".join(self.pieces.get(reply_to, []))
        want = self.expected.get(reply_to)
        self.seen[reason] += 1
        if want is None:
            self.problem(f"a reply to a message never sent: {reply_to}")
        elif reason == "stop" and text != want:
            self.problem(f"reply {reply_to} ended 'stop' with {text!r}, not {want!r}")
        elif reason in ("interrupted", "cancelled") and not want.startswith(text):
            self.problem(f"{reason} reply {reply_to} has a hole: {text!r}")
        elif reason not in ("stop", "interrupted", "cancelled"):
            self.problem(f"reply {reply_to} ended {reason!r}")
        self.ended[reply_to] = reason


class Session:
    """A session with a socket on each instance."""

    def __init__(self, sockets: list[Tracked], expected: dict[str, str]) -> None:
        self.id = sockets[0].client.session
        self.sockets = sockets
        self.expected = expected
        self.slot = -1

    async def send(self, msg_id: str, text: str, via: int) -> None:
        self.expected[msg_id] = expected(text)
        await self.sockets[via].client.send({"type": "message", "id": msg_id, "text": text})

    async def streaming(self, msg_id: str) -> None:
        await asyncio.gather(*(s.until_streaming(msg_id) for s in self.sockets))

    async def ended(self, msg_id: str, timeout_s: float = FRAME_TIMEOUT_S) -> list[str]:
        return await asyncio.gather(*(s.until_ended(msg_id, timeout_s) for s in self.sockets))

    async def reply(self, msg_id: str, text: str, via: int) -> str:
        """Send `text` on one socket: the refusal it got, or how the reply ended on both."""
        await self.send(msg_id, text, via)
        ending = await self.sockets[via].until_ended(msg_id)
        if ending.startswith("refused"):
            return ending
        endings = await self.ended(msg_id)
        assert endings == [ending] * 2, (msg_id, endings)
        return ending

    @property
    def problems(self) -> list[str]:
        return [p for s in self.sockets for p in s.problems]

    def longest_pause_s(self, msg_id: str) -> float:
        """The longest a socket waited between two deltas of the reply."""
        times = [s.arrivals.get(msg_id, []) for s in self.sockets]
        return max((b - a for t in times for a, b in pairwise(t)), default=0.0)

    @property
    def seen(self) -> Counter[str]:
        return sum((s.seen for s in self.sockets), Counter())


def session_slot(redis: RedisClusterProcess, session: str) -> int:
    """The one slot the keys of `session` are in: each is tagged `{session}`, and there is one."""
    pattern = f"*{{{session}}}*"
    keys = [key for master in redis.masters for key in master.command("KEYS", pattern)]
    slots = {redis.slot_of(key) for key in keys}
    assert len(slots) == 1, f"keys of {session} in slots {slots}: {keys}"
    return slots.pop()


async def open_session(stack: AsyncExitStack, deployment: Deployment, n: int) -> Session:
    """A new session with a socket on each instance, stored (its first reply, through the
    instance `n % 2`)."""
    one, two = deployment.instances
    first = await stack.enter_async_context(connect(one.ws_url))
    second = await stack.enter_async_context(connect(two.ws_url, first.session))
    texts: dict[str, str] = {}
    session = Session([Tracked(first, texts), Tracked(second, texts)], texts)
    assert await session.reply("hello", f"hello {n}", via=n % 2) == "stop"
    session.slot = await asyncio.to_thread(session_slot, deployment.redis, session.id)
    return session


async def open_sessions(
    stack: AsyncExitStack, deployment: Deployment, per_shard: int
) -> list[Session]:
    """New sessions until every shard holds at least `per_shard` of them."""
    sessions: list[Session] = []
    masters = {master.port for master in deployment.redis.masters}
    while True:
        shards = Counter(deployment.redis.node_of_slot(s.slot).port for s in sessions)
        if set(shards) == masters and min(shards.values()) >= per_shard:
            return sessions
        assert len(sessions) < 40, f"sessions by shard: {shards}"
        batch = range(len(sessions), len(sessions) + 3)
        sessions += await asyncio.gather(*(open_session(stack, deployment, n) for n in batch))


async def serve_again(
    session: Session, label: str, deadline: float, vias: tuple[int, ...] = (0, 1)
) -> None:
    """A new message on `session` gets its whole reply on both instances, sent through each
    instance of `vias` in turn; one refused (`unavailable`) or cut short (`interrupted`) by the
    outage is sent again, the way a client would, until `deadline`."""
    for via in vias:
        attempt = 0
        while (ending := await session.reply(f"{label}-{via}-{attempt}", label, via)) != "stop":
            assert ending != "stop" and time.monotonic() < deadline, (label, ending)
            attempt += 1
            await asyncio.sleep(0.2)  # a client's back-off before sending again


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


@pytest.mark.parametrize("shard", ["shared", "sessions only"])
async def test_a_master_killed_mid_reply_ends_every_reply_and_its_replica_serves_on(
    whole: Deployment, stack: AsyncExitStack, shard: str
) -> None:
    """The shard killed holds live sessions, and either also what all instances share (the
    `{chatbot}` slot: liveness, counters, the epoch) or nothing else."""
    redis = whole.redis
    sessions = await open_sessions(stack, whole, per_shard=3)
    shared = redis.node_of_slot(redis.slot_of("{chatbot}"))
    victim = shared if shard == "shared" else next(m for m in redis.masters if m is not shared)
    hit = [s for s in sessions if redis.node_of_slot(s.slot) is victim]
    spared = [s for s in sessions if s not in hit]
    idle, streaming = hit[-1], [s for s in sessions if s is not hit[-1]]
    for n, session in enumerate(streaming):
        await session.send("long", f"through the failover {n} {STREAM}", via=n % 2)
    await asyncio.gather(*(s.streaming("long") for s in streaming))

    redis.kill_master(victim)
    killed = time.monotonic()

    def failover() -> float:
        redis.wait_failover(2 * PROMOTED_WITHIN_S)
        return time.monotonic() - killed

    async def first_served() -> float:
        """A message sent to the shard just after its master died."""
        await serve_again(idle, "in-the-outage", killed + 2 * PROMOTED_WITHIN_S, vias=(0,))
        return time.monotonic() - killed

    promotion = asyncio.ensure_future(asyncio.to_thread(failover))
    try:
        endings, served_s, promoted_s = await asyncio.gather(
            asyncio.gather(*(s.ended("long", timeout_s=60) for s in streaming)),
            first_served(),
            promotion,
        )
    finally:
        promotion.cancel()
    problems = [p for s in sessions for p in s.problems]
    assert not problems, problems
    for session, ending in zip(streaming, endings, strict=True):
        assert set(ending) <= {"stop", "interrupted"}, (session.id, ending)
        if session in spared:  # the other shards' sessions never noticed
            assert ending == ["stop", "stop"], (session.id, ending)
            assert session.seen["interrupted"] == session.seen["resync"] == 0, session.seen
    spared_pause = max(s.longest_pause_s("long") for s in spared)
    assert spared_pause < UNDISTURBED_PAUSE_S, spared_pause
    assert redis.node_of_slot(idle.slot) is not victim
    assert promoted_s <= PROMOTED_WITHIN_S, promoted_s
    assert served_s <= promoted_s + SERVED_WITHIN_S, (served_s, promoted_s)

    # Every session of the shard takes new messages on either instance at once, and a stop
    # sent to one instance still reaches the other, generating, one.
    await asyncio.gather(*(serve_again(s, "after", time.monotonic() + 2) for s in hit))
    await idle.send("stopped", f"stop me {STREAM}", via=0)
    await idle.streaming("stopped")
    await idle.sockets[1].client.send({"type": "stop"})
    assert await idle.ended("stopped") == ["cancelled", "cancelled"]
    # The old master comes back, as its successor's replica, while the shard streams.
    for n, session in enumerate(hit):
        await session.send("back", f"the old master returns {n} {STREAM}", via=n % 2)
    await asyncio.gather(*(s.streaming("back") for s in hit))
    rejoin = asyncio.ensure_future(asyncio.to_thread(redis.restart, victim))
    try:
        backs = await asyncio.gather(*(s.ended("back") for s in hit))
        await rejoin
    finally:
        rejoin.cancel()
    assert backs == [["stop", "stop"]] * len(hit), backs
    assert redis.replicas_of(redis.node_of_slot(idle.slot)) == [victim]
    rejoin_pause = max(s.longest_pause_s("back") for s in hit)
    assert rejoin_pause < UNDISTURBED_PAUSE_S, rejoin_pause
    problems = [p for s in sessions for p in s.problems]
    assert not problems, problems
    hit_seen = sum((s.seen for s in hit), Counter())
    hit_pause = max(s.longest_pause_s("long") for s in hit if s is not idle)
    promoted_at = killed + promoted_s
    resumed_s = max(  # from the promotion to the first delta after it, on the shard's sockets
        min((t for t in sock.arrivals["long"] if t > promoted_at), default=promoted_at)
        - promoted_at
        for session in hit
        if session is not idle
        for sock in session.sockets
    )
    print(
        f"\nfailover ({shard}): {len(hit)} sessions hit ({len(hit) - 1} streaming), "
        f"{len(spared)} spared; promoted {promoted_s:.1f} s after the kill, a message sent "
        f"then served {served_s:.1f} s after it; the shard's sockets saw {dict(hit_seen)}; "
        f"longest pause between deltas {hit_pause:.2f} s on the shard, {spared_pause:.2f} s off "
        f"it; its replies went on {resumed_s:.2f} s after the promotion"
    )


async def test_live_sessions_slots_move_to_another_master_mid_reply(
    whole: Deployment, stack: AsyncExitStack
) -> None:
    redis = whole.redis
    sessions = await open_sessions(stack, whole, per_shard=2)
    source = redis.node_of_slot(sessions[0].slot)
    moving = [s for s in sessions if redis.node_of_slot(s.slot) is source][:3]
    target = next(master for master in redis.masters if master is not source)
    for n, session in enumerate(sessions):
        await session.send("long", f"through the move {n} {LONGER}", via=n % 2)
    await asyncio.gather(*(s.streaming("long") for s in sessions))

    def move() -> tuple[float, float]:
        """Seconds from the first delta to the move's start and to its end."""

        def half_moved() -> None:
            time.sleep(0.2)  # the slot stays half moved a while: its keys are on both masters

        begun = time.monotonic() - streaming
        slots = {s.slot for s in moving}
        redis.migrate_slots(slots, target, keys_per_call=1, after_each_call=half_moved)
        return begun, time.monotonic() - streaming

    streaming = time.monotonic()
    migration = asyncio.ensure_future(asyncio.to_thread(move))
    try:
        endings = await asyncio.gather(*(s.ended("long", timeout_s=60) for s in sessions))
        ended_s = time.monotonic() - streaming
        begun_s, moved_s = await migration
    finally:
        migration.cancel()
    assert moved_s < ended_s, "the slots moved after the replies ended"
    problems = [p for s in sessions for p in s.problems]
    assert not problems, problems
    # Nothing was lost: no reply cut short, no resync, anywhere.
    assert endings == [["stop", "stop"]] * len(sessions), endings
    assert not any(s.seen["resync"] for s in sessions)
    for session in moving:
        assert redis.node_of_slot(session.slot) is target
        assert await asyncio.to_thread(session_slot, redis, session.id) == session.slot
        assert source.command("CLUSTER", "COUNTKEYSINSLOT", session.slot) == 0
    # The sessions' events follow the slot: a message on either instance reaches the other.
    for session in moving:
        for via in (0, 1):
            assert await session.reply(f"moved-{via}", f"after the move {via}", via) == "stop"
    problems = [p for s in sessions for p in s.problems]
    assert not problems, problems
    still = [s for s in sessions if s not in moving]
    still_pause = max(s.longest_pause_s("long") for s in still)
    assert still_pause < UNDISTURBED_PAUSE_S, still_pause
    moving_pause = max(s.longest_pause_s("long") for s in moving)
    print(
        f"\nresharding: {len(moving)} of {len(sessions)} sessions' slots moved from "
        f"{begun_s:.1f} s to {moved_s:.1f} s into replies that ended at {ended_s:.1f} s; "
        f"longest pause between deltas {moving_pause:.2f} s moving, {still_pause:.2f} s not"
    )


async def test_the_slot_every_instance_shares_moves_mid_reply_unnoticed(
    whole: Deployment, stack: AsyncExitStack
) -> None:
    """The `{chatbot}` slot (the instances' liveness, counters, the secret that signs new
    session ids, the epoch) moves to another master while sessions stream and new ones open:
    nothing is refused, cut short or resynced."""
    redis = whole.redis
    sessions = await open_sessions(stack, whole, per_shard=1)
    slot = redis.slot_of("{chatbot}")
    source = redis.node_of_slot(slot)
    target = next(master for master in redis.masters if master is not source)
    keys = int(source.command("CLUSTER", "COUNTKEYSINSLOT", slot))
    for n, session in enumerate(sessions):
        await session.send("long", f"through the move {n} {LONGER}", via=n % 2)
    await asyncio.gather(*(s.streaming("long") for s in sessions))

    def half_moved() -> None:
        time.sleep(0.2)  # the slot stays half moved a while: its keys are on both masters

    migration = asyncio.ensure_future(
        asyncio.to_thread(
            redis.migrate_slots, [slot], target, keys_per_call=1, after_each_call=half_moved
        )
    )
    newcomers: list[Session] = []
    replies = asyncio.ensure_future(
        asyncio.gather(*(s.ended("long", timeout_s=60) for s in sessions))
    )
    try:
        while not migration.done():  # new sessions, each stored and answered, during the move
            newcomers.append(await open_session(stack, whole, len(sessions) + len(newcomers)))
        endings = await replies
        await migration
    finally:
        migration.cancel()
        replies.cancel()
    problems = [p for s in (*sessions, *newcomers) for p in s.problems]
    assert not problems, problems
    assert endings == [["stop", "stop"]] * len(sessions), endings
    assert not any(s.seen["resync"] for s in (*sessions, *newcomers))
    assert redis.node_of_slot(slot) is target
    assert source.command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    pause = max(s.longest_pause_s("long") for s in sessions)
    assert pause < UNDISTURBED_PAUSE_S, pause
    await wait_ready(whole.instances, 1)
    print(
        f"\nshared slot moved ({keys} keys): {len(sessions)} sessions streaming, "
        f"{len(newcomers)} opened meanwhile; longest pause between deltas {pause:.2f} s"
    )
