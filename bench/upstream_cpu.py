"""CPU per reply of the model client alone: `open_model(...).stream` against the fake upstream.

    python -m bench.upstream_cpu [--replies 2000] [--concurrency 200] [--chunks 20]

The fake runs in its own process (on the other CPU when there are two), so the process time
measured here is the client's: building and sending the request, reading and parsing the
server-sent events, the deadlines. It isolates the largest cost of a relayed reply (see
docs/benchmarks.md) so a change to `chatbot/llm/` can be judged in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from chatbot.cli import run
from chatbot.llm import open_model
from chatbot.settings import Settings

from .procs import Server, free_port, python


async def _measure(args: argparse.Namespace, base_url: str) -> None:
    settings = Settings.from_env({"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "sk-bench"})
    model = open_model(settings)
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
    port = free_port()
    argv = [python(), "-m", "chatbot.fake_openai", "--port", str(port), "--ttft-ms", "20"]
    argv += ["--chunks", str(args.chunks), "--interval-ms", "5"]
    pinned = (os.cpu_count() or 1) > 1
    fake = Server(
        "fake",
        argv,
        port=port,
        log_dir=Path(tempfile.mkdtemp(prefix="upstream-cpu-")),
        cpus=frozenset({1}) if pinned else None,
        health_path="/v1/models",
    ).start()
    try:
        if pinned:
            os.sched_setaffinity(0, {0})
        run(_measure(args, f"http://127.0.0.1:{port}/v1"))
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
