"""Three instances behind HAProxy act as one server: fan-out, stop, busy, failover, Redis faults.

What the instances share Redis for runs on one Redis and on a Redis Cluster (`@ON_EVERY_REDIS`);
a whole shard's failover and slots moving are in test_failover_and_resharding.py."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
import websockets

from chatbot.fake_openai import parse_prompt, reply_text

from ..support.waiting import wait_until
from .conftest import LEASE_S, ON_EVERY_REDIS, Cluster, connect, seqs, text_of

pytestmark = pytest.mark.cluster

LONG = "[[fake:chunks=40]] [[fake:interval_ms=50]]"  # a reply of about 2 s


def expected(message: str, chunks: int) -> str:
    return reply_text(parse_prompt(message)[0], chunks)


async def fake_requests(cluster: Cluster) -> list[dict]:
    async with httpx.AsyncClient(timeout=5) as client:
        reply = await client.get(f"http://127.0.0.1:{cluster.fake.port}/_fake/requests")
        return reply.json()  # type: ignore[no-any-return]


async def wait_fake_request_ended(cluster: Cluster, n: int) -> dict:
    async with httpx.AsyncClient(timeout=10) as client:
        url = f"http://127.0.0.1:{cluster.fake.port}/_fake/requests/{n}?wait=ended&timeout_s=5"
        reply = await client.get(url)
        assert reply.status_code == 200, reply.text
        return reply.json()  # type: ignore[no-any-return]


@ON_EVERY_REDIS
async def test_sockets_of_one_session_on_different_instances_see_the_same_events(
    live: Cluster,
) -> None:
    one, two, three = live.instances
    async with connect(one.ws_url) as a:
        async with connect(two.ws_url, a.session) as b, connect(three.ws_url, a.session) as c:
            last = 1  # a session's first event has seq 1
            for n in range(3):
                await (a, b, c)[n].send({"type": "message", "text": f"turn {n}"})
                seen = [await s.until_done() for s in (a, b, c)]
                assert seen[0] == seen[1] == seen[2]
                assert text_of(seen[0]) == expected(f"turn {n}", 5)
                # Contiguous from the previous turn on (pieces read together are one delta).
                assert seqs(seen[0]) == list(range(last, last + len(seqs(seen[0]))))
                last += len(seqs(seen[0]))


@ON_EVERY_REDIS
async def test_stop_sent_to_one_instance_stops_the_reply_generating_on_another(
    live: Cluster,
) -> None:
    one, two, _ = live.instances
    before = len(await fake_requests(live))
    async with connect(one.ws_url) as a, connect(two.ws_url) as _:
        async with connect(two.ws_url, a.session) as b:
            await a.send({"type": "message", "id": "long", "text": f"stop me {LONG}"})
            await b.until(lambda f: f["type"] == "delta")
            await b.send({"type": "stop"})
            frames = await a.until_done()
            assert frames[-1]["reason"] == "cancelled"
            assert (await b.until_done())[-1] == frames[-1]
    record = await wait_fake_request_ended(live, before + 1)
    assert record["status"] == "aborted"
    assert record["chunks_sent"] < 40


@ON_EVERY_REDIS
async def test_a_message_on_another_instance_while_one_streams_is_busy(live: Cluster) -> None:
    one, two, _ = live.instances
    async with connect(one.ws_url) as a, connect(two.ws_url, a.session) as b:
        await a.send({"type": "message", "text": f"first {LONG}"})
        await a.until(lambda f: f["type"] == "delta")
        await b.send({"type": "message", "id": "second", "text": "me too"})
        refusal = await b.until(lambda f: f["type"] == "error")
        assert refusal[-1]["code"] == "busy"
        assert refusal[-1]["id"] == "second"
        await a.send({"type": "stop"})
        await a.until_done()


@pytest.mark.parametrize(
    ("live", "attempt"),
    [("redis", 1), ("redis", 2), ("redis", 3), ("redis+cluster", 1)],
    indirect=["live"],
)
async def test_killing_the_instance_holding_a_socket_loses_nothing_on_resume(
    live: Cluster, attempt: int
) -> None:
    """kill -9 the socket's instance mid-reply (the reply runs on another instance): the client
    reconnects through the balancer with `after` and ends with exactly the full reply."""
    async with connect(live.lb.ws_url) as watcher:
        holder = live.by_server(watcher.server or "")
        generator = next(i for i in live.instances if i is not holder)
        frames: list[dict] = []
        async with connect(generator.ws_url, watcher.session) as sender:
            message = f"survive {attempt} {LONG}"
            await sender.send({"type": "message", "id": f"m{attempt}", "text": message})
            frames += await watcher.until(lambda f: f["type"] == "delta" and f["seq"] >= 5)
            holder.kill()
            with pytest.raises(websockets.ConnectionClosed):
                while True:  # whatever was in flight before the socket broke still counts
                    frames.append(await watcher.recv())
    async with connect(live.lb.ws_url, watcher.session, after=frames[-1]["seq"]) as resumed:
        assert resumed.server != watcher.server
        frames += await resumed.until_done()
    assert seqs(frames) == list(range(1, len(seqs(frames)) + 1))  # none lost, none twice
    assert text_of(frames) == expected(message, 40)
    assert frames[-1]["reason"] == "stop"


@ON_EVERY_REDIS
async def test_killing_the_generating_instance_ends_the_reply_as_interrupted_in_bounded_time(
    live: Cluster,
) -> None:
    one, two, _ = live.instances
    async with connect(one.ws_url) as watcher, connect(two.ws_url, watcher.session) as sender:
        await sender.send({"type": "message", "id": "doomed", "text": f"doomed {LONG}"})
        await watcher.until(lambda f: f["type"] == "delta")
        two.kill()
        killed_at = time.monotonic()
        frames = await watcher.until_done(timeout_s=LEASE_S * 3 + 5)
        waited_s = time.monotonic() - killed_at
        assert frames[-1] == {"type": "done", "seq": frames[-1]["seq"], "reply_to": "doomed",
                              "reason": "interrupted"}  # fmt: skip
        # The bound: one lease TTL for the lease to lapse, a sweep interval to notice it.
        assert waited_s <= LEASE_S + LEASE_S / 4 + 1.5, waited_s
        # The session is usable again, and the user's message stayed in the context.
        await watcher.send({"type": "message", "text": "and now?"})
        after = await watcher.until_done()
        assert after[-1]["reason"] == "stop"
    context = (await fake_requests(live))[-1]["messages"]
    assert [m["content"] for m in context if m["role"] == "user"][-2:] == [
        f"doomed {LONG}",
        "and now?",
    ]


async def test_redis_restart_mid_reply_sockets_survive_and_recover_missed_events(
    live: Cluster,
) -> None:
    one, two, three = live.instances
    async with connect(one.ws_url) as a, connect(two.ws_url, a.session) as b:
        async with connect(three.ws_url, a.session) as generator:
            message = f"through the outage {LONG}"
            await generator.send({"type": "message", "text": message})
            early = await a.until(lambda f: f["type"] == "delta")
            live.redis.kill()
            async with httpx.AsyncClient(timeout=2) as http:

                async def not_ready() -> bool:
                    return (await http.get(one.url + "/readyz")).status_code == 503

                await wait_until(not_ready, timeout_s=10)
            live.redis.start()
            frames_a = early + await a.until_done(timeout_s=30)
            frames_b = await b.until_done(timeout_s=30)
            frames_gen = await generator.until_done(timeout_s=30)
        for frames in (frames_a, frames_gen):
            # Pieces that reached the server together during the outage are one delta each.
            assert seqs(frames) == list(range(1, 1 + len(frames)))
            assert text_of(frames) == expected(message, 40)
        assert text_of(frames_b) == expected(message, 40)
        # Events written after recovery reach every socket.
        await b.send({"type": "message", "text": "after the outage"})
        for sock in (a, b):
            assert text_of(await sock.until_done()) == expected("after the outage", 5)
    # A client that was away during the outage recovers everything with `after`.
    async with connect(live.lb.ws_url, a.session, after=0) as late:
        replay = await late.until(lambda f: f["type"] == "done" and f["seq"] == late.ready["seq"])
    assert text_of(replay) == expected(message, 40) + expected("after the outage", 5)


@ON_EVERY_REDIS
async def test_ask_api_across_instances(live: Cluster) -> None:
    one, two, three = live.instances
    async with httpx.AsyncClient(timeout=5) as http:
        accepted = await http.post(one.url + "/api/ask", json={"message": f"by http {LONG}"})
        assert accepted.status_code == 202
        task = accepted.json()
        async with connect(three.ws_url, task["session"], after=0) as watcher:
            seen = await watcher.until_done()
        reply = (await http.get(f"{two.url}/api/tasks/{task['task']}")).json()
    assert reply == {"status": "done", "response": text_of(seen), "reason": "stop"}
    assert reply["response"] == expected(f"by http {LONG}", 40)


async def test_sigterm_mid_reply_hands_the_socket_to_another_instance(live: Cluster) -> None:
    """Graceful restart: the socket closes with 1012 at once, the client resumes elsewhere and
    sees the reply, which the restarting instance finishes within its grace, arrive whole."""
    one, two, _ = live.instances
    frames: list[dict] = []
    async with connect(one.ws_url) as client:
        message = f"restart {LONG}"
        await client.send({"type": "message", "text": message})
        frames += await client.until(lambda f: f["type"] == "delta")
        one.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                frames.append(await client.recv())
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    async with connect(two.ws_url, client.session, after=frames[-1]["seq"]) as resumed:
        frames += await resumed.until_done()
    assert text_of(frames) == expected(message, 40)
    assert frames[-1]["reason"] == "stop"
    assert one.terminate(timeout_s=15) == 0
