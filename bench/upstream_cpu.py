"""CPU per reply of the model client alone: `OpenAIModel.stream` against the fake upstream.

    python -m bench.upstream_cpu [--replies 2000] [--concurrency 200] [--chunks 20]

The fake runs in its own process (on the other CPU when there are two), so the process time
measured here is the client's: building and sending the request, reading and parsing the
server-sent events, the deadlines. It isolates the largest cost of a relayed reply (see
docs/benchmarks.md) so a change to `chatbot/llm/openai.py` can be judged in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

from chatbot.llm.openai import OpenAIModel
from chatbot.settings import Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_port(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


async def _measure(args: argparse.Namespace, base_url: str) -> None:
    settings = Settings.from_env({"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "sk-bench"})
    model = OpenAIModel(settings)
    history = [{"role": "user", "content": "Hello there, how are you?"}] * args.history
    gate = asyncio.Semaphore(args.concurrency)

    async def one() -> int:
        async with gate, model.stream(history) as reply:  # type: ignore[arg-type]
            return sum([len(piece) async for piece in reply])

    await asyncio.gather(*(one() for _ in range(50)))  # warm up: connections, caches
    cpu, wall = time.process_time(), time.perf_counter()
    sizes = await asyncio.gather(*(one() for _ in range(args.replies)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await model.close()
    assert all(sizes), "a reply came back empty"
    print(
        f"{args.replies} replies x {args.chunks} chunks, {args.concurrency} at a time, "
        f"history {args.history}: {cpu * 1000 / args.replies:.3f} ms CPU/reply, "
        f"{cpu * 1e6 / (args.replies * args.chunks):.1f} us/chunk, wall {wall:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replies", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--history", type=int, default=6, help="messages sent per request")
    args = parser.parse_args()
    port = _free_port()
    fake = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatbot.fake_openai",
            "--port",
            str(port),
            "--ttft-ms",
            "20",
            "--chunks",
            str(args.chunks),
            "--interval-ms",
            "5",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(fake.pid, {1})
            os.sched_setaffinity(0, {0})
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(_wait_port(port))
        runner(_measure(args, f"http://127.0.0.1:{port}/v1"))
    finally:
        fake.terminate()
        fake.wait(10)


if __name__ == "__main__":
    main()
