"""`chatbot serve --workers 2`: two full instances on one port, one session served across both,
SIGTERM drains every worker. Real processes: redis-server, the fake upstream, the supervisor and
its workers; the worker holding each socket is read from /proc."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack

import httpx
import pytest
import websockets

from ..support.procs import (
    ChatbotProcess,
    FakeOpenAIProcess,
    RedisProcess,
    children,
    free_port,
    serving_pid,
)
from ..support.waiting import wait_until
from .conftest import Client, connect, text_of

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(sys.platform != "linux", reason="reads processes from /proc"),
]

MAX_SOCKETS = 40  # to find one on each worker: all on one has a chance of 2**-39
CHUNKS = 40


def expected(prompt: str, chunks: int) -> str:
    return "You said: " + prompt + "\n" + "".join(f"word{k} " for k in range(1, chunks))


@pytest.fixture
def upstream() -> Iterator[tuple[RedisProcess, FakeOpenAIProcess]]:
    redis = RedisProcess().start()
    fake = FakeOpenAIProcess("--ttft-ms", "50", "--chunks", "5", "--interval-ms", "20").start()
    yield redis, fake
    fake.stop()
    redis.stop()


@pytest.fixture
async def two_workers(
    upstream: tuple[RedisProcess, FakeOpenAIProcess],
) -> AsyncIterator[tuple[ChatbotProcess, list[int]]]:
    redis, fake = upstream
    env = {
        "REDIS_URL": redis.url,
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-workers-test",
        "SHUTDOWN_GRACE_S": "10",
    }
    server = ChatbotProcess(env, name="chatbot-workers", args=("--workers", "2")).start()
    workers: list[int] = []
    try:
        instances: set[str] = set()
        async with httpx.AsyncClient(timeout=2) as client:

            async def both_ready() -> bool:  # a fresh connection each time: any worker answers
                reply = await client.get(server.url + "/readyz", headers={"Connection": "close"})
                if reply.status_code == 200:
                    instances.add(reply.json()["instance"])
                return len(instances) == 2 and len(children(server.pid)) == 2

            await wait_until(both_ready, timeout_s=30)
        workers = children(server.pid)
        yield server, workers
    finally:
        server.stop()
        for pid in workers:  # none should be left; if one is, it must not outlive the test
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_two_workers_serve_one_session_and_drain_on_sigterm(
    two_workers: tuple[ChatbotProcess, list[int]],
) -> None:
    server, workers = two_workers
    async with AsyncExitStack() as stack:
        on: dict[int, Client] = {}  # worker pid -> a socket it serves
        for _ in range(MAX_SOCKETS):
            session = next(iter(on.values())).session if on else None
            client = await stack.enter_async_context(connect(server.ws_url, session))
            pid = serving_pid(workers, server.port, client.ws.local_address[1])
            assert pid in workers
            on.setdefault(pid, client)
            if len(on) == 2:
                break
        assert len(on) == 2, "every socket landed on one worker"
        a, b = on.values()
        assert a.session == b.session

        for sender, n in ((a, 0), (b, 1)):  # a message sent through each worker
            await sender.send({"type": "message", "text": f"turn {n}"})
            seen = [await s.until_done() for s in (a, b)]
            assert seen[0] == seen[1]
            assert text_of(seen[0]) == expected(f"turn {n}", 5)

        # SIGTERM to the supervisor only (not Heroku's way, to every process): it drains both.
        long = f"[[fake:chunks={CHUNKS}]] and the restart"
        await a.send({"type": "message", "text": long})
        await a.until(lambda f: f["type"] == "delta")
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for client in (a, b):
            with pytest.raises(websockets.ConnectionClosed) as closed:
                async with asyncio.timeout(15):
                    while True:
                        await client.recv(15)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert await asyncio.to_thread(server.proc.wait, 30) == 0  # type: ignore[union-attr]
    output = server.output()
    assert output.count("shutting down: draining sockets and replies") == 2, output[-3000:]


async def test_a_killed_worker_is_replaced(two_workers: tuple[ChatbotProcess, list[int]]) -> None:
    server, workers = two_workers
    os.kill(workers[0], signal.SIGKILL)

    async def replaced() -> bool:
        now = children(server.pid)
        return len(now) == 2 and workers[0] not in now and workers[1] in now

    await wait_until(replaced, timeout_s=30)
    async with connect(server.ws_url) as client:  # whichever worker takes it serves a chat
        await client.send({"type": "message", "text": "still here"})
        assert text_of(await client.until_done()) == expected("still here", 5)
    assert server.proc.poll() is None  # type: ignore[union-attr]


async def test_workers_of_a_killed_supervisor_drain_and_exit(
    two_workers: tuple[ChatbotProcess, list[int]],
) -> None:
    """SIGKILL to the supervisor: the kernel sends each worker SIGTERM, and they drain and exit
    instead of serving on, orphaned, on the port."""
    server, workers = two_workers
    server.kill()

    async def gone() -> bool:
        return not any(_alive(pid) for pid in workers)

    await wait_until(gone, timeout_s=30)
    assert server.output().count("shutting down: draining sockets and replies") == 2


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (dead) parent's reaper."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_without_redis_are_refused() -> None:
    """--workers 2 with the in-process broker: a clear refusal naming REDIS_URL, at once."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WEB_CONCURRENCY")}
    result = subprocess.run(
        [sys.executable, "-m", "chatbot", "serve", "--workers", "2", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "REDIS_URL" in result.stderr and "--workers 2" in result.stderr


def test_web_concurrency_without_redis_serves_with_one_process() -> None:
    """Heroku's buildpack sets WEB_CONCURRENCY on every dyno: without Redis it is ignored, said
    in the log, and the app serves as one instance rather than not at all."""
    server = ChatbotProcess({"WEB_CONCURRENCY": "2", "REDIS_URL": ""}, name="chatbot-one")
    try:
        server.start()
        assert children(server.pid) == []
        assert "WEB_CONCURRENCY=2 ignored" in server.output()
    finally:
        server.stop()
