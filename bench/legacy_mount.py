"""Blocking legacy views beside streaming chats: does a mounted Flask app (WSGI_APP) delay the
chat? One chatbot process serves `bench.legacy_slow:app` (2 s blocking views) in its thread pool
while 100 chat sockets stream from the fake OpenAI server (300 ms to the first token, then 20
chunks 100 ms apart).

    python -m bench.legacy_mount                 # 100 sockets, 50 legacy clients, 2 s views
    python -m bench.legacy_mount --cpu-ms 20     # views that also hold the GIL for 20 ms

Two phases on the same server: the chats alone (baseline), then the chats while `--legacy`
clients each request the slow view in a loop. Each socket sends `--messages` messages one after
the other, all sockets together; the time to first delta (TTFD) is measured from the send to the
first `delta`. The row is the p99 TTFD of each phase and their difference (the target: at most
100 ms), with the legacy requests served and the machine's load, so a noisy run shows as one.
The server is pinned to CPU 0, the fake upstream and this load generator to the other CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from .procs import Server, chatbot_env, free_port, machine_busy_s, python
from .report import percentile

SHAPE = ("300", "20", "100")  # ttft ms, chunks, interval ms: bench.run's realistic shape


async def chat(url: str, messages: int, start: asyncio.Barrier, ttfd: list[float]) -> None:
    async with connect(url, max_queue=None) as ws:
        json.loads(await ws.recv())  # ready
        await start.wait()
        for n in range(messages):
            sent = time.monotonic()
            await ws.send(json.dumps({"type": "message", "text": f"question {n}"}))
            first = True
            while (frame := json.loads(await ws.recv()))["type"] != "done":
                if frame["type"] == "delta" and first:
                    ttfd.append(time.monotonic() - sent)
                    first = False
                elif frame["type"] == "error":
                    raise RuntimeError(frame)


async def legacy_loop(
    base: str, view: dict[str, str], stop: asyncio.Event, got: list[float]
) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        while not stop.is_set():
            started = time.monotonic()
            reply = await client.get("/slow", params=view)
            reply.raise_for_status()
            got.append(time.monotonic() - started)


async def legacy_clients(base: str, n: int, view: dict[str, str]) -> None:
    """In a process of its own (so their work does not delay the chat client's loop): `n`
    clients requesting the view in a loop until a line arrives on stdin; then the durations as
    one JSON line on stdout."""
    stop = asyncio.Event()
    got: list[float] = []
    loops = [asyncio.create_task(legacy_loop(base, view, stop, got)) for _ in range(n)]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    await asyncio.gather(*loops)
    print(json.dumps(got), flush=True)


async def phase(args: argparse.Namespace, port: int, legacy: int) -> dict[str, Any]:
    ws_url = f"ws://127.0.0.1:{port}/ws"
    ttfd: list[float] = []
    legacy_s: list[float] = []
    loader = None
    if legacy:
        view = json.dumps({"s": str(args.view_s), "cpu_ms": str(args.cpu_ms)})
        loader = await asyncio.create_subprocess_exec(
            python(),
            "-m",
            "bench.legacy_mount",
            "--legacy-worker",
            str(port),
            str(legacy),
            view,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(args.view_s + 1)  # every thread busy, a queue waiting, before chats
    busy0, load0, wall0 = machine_busy_s(), os.getloadavg()[0], time.monotonic()
    start = asyncio.Barrier(args.sockets)
    async with asyncio.timeout(300):
        await asyncio.gather(
            *(chat(ws_url, args.messages, start, ttfd) for _ in range(args.sockets))
        )
    wall = time.monotonic() - wall0
    busy = machine_busy_s() - busy0
    if loader is not None:
        assert loader.stdin is not None and loader.stdout is not None
        loader.stdin.write(b"stop\n")
        async with asyncio.timeout(300):
            legacy_s = json.loads(await loader.stdout.readline())
            await loader.wait()
    return {
        "legacy_clients": legacy,
        "ttfd_p50_ms": 1000 * (percentile(ttfd, 50) or 0),
        "ttfd_p99_ms": 1000 * (percentile(ttfd, 99) or 0),
        "ttfd_max_ms": 1000 * max(ttfd),
        "samples": len(ttfd),
        "legacy_served": len(legacy_s),
        "legacy_p50_s": percentile(legacy_s, 50),
        "machine_busy_cores": busy / wall,
        "loadavg_1m_before": load0,
        "loadavg_1m_after": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--legacy-worker"]:
        port, n, view = argv[1:4]
        return asyncio.run(legacy_clients(f"http://127.0.0.1:{port}", int(n), json.loads(view)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=100)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--legacy", type=int, default=50, help="concurrent legacy clients")
    parser.add_argument("--view-s", type=float, default=2.0)
    parser.add_argument("--cpu-ms", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=16, help="WSGI_THREADS")
    parser.add_argument("--repeat", type=int, default=1, help="run both phases this many times")
    parser.add_argument(
        "--nice", type=int, default=0, help="niceness for every process (as bench.run --nice)"
    )
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # this process and all it starts: ahead of the rest of the machine

    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = frozenset(cpus[:1]) if len(cpus) > 1 else None
    client_cpus = set(cpus[1:]) if len(cpus) > 1 else None
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-legacy-"))
    fake_port, port = free_port(), free_port()
    fake_argv = [python(), "-m", "chatbot.fake_openai", "--port", str(fake_port)]
    fake_argv += ["--ttft-ms", SHAPE[0], "--chunks", SHAPE[1], "--interval-ms", SHAPE[2]]
    fake = Server(
        "fake",
        fake_argv,
        port=fake_port,
        log_dir=log_dir,
        cpus=frozenset(client_cpus) if client_cpus else None,
        health_path=None,
    ).start()
    env = chatbot_env(
        port,
        fake_port,
        WSGI_APP="bench.legacy_slow:app",
        WSGI_THREADS=str(args.threads),
        MAX_SOCKETS_PER_IP="100000",
        RATE_LIMIT_SESSION="100000/minute",
        RATE_LIMIT_IP="1000000/minute",
        RATE_LIMIT_HANDSHAKES_IP="1000000/minute",
        MAX_REPLIES_PER_IP="100000",
        IP_TOKEN_BUDGET="1000000000/day",
        LOG_LEVEL="WARNING",
    )
    server = Server(
        "chatbot",
        [python(), "-m", "chatbot", "serve"],
        port=port,
        log_dir=log_dir,
        env=env,
        cpus=server_cpus,
    ).start()
    rows = []
    try:
        asyncio.run(phase(argparse.Namespace(**{**vars(args), "messages": 1}), port, 0))  # warm-up
        for _ in range(args.repeat):
            for legacy in (0, args.legacy):
                rows.append(asyncio.run(phase(args, port, legacy)))
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        server.stop()
        fake.stop()
    print(
        f"\n{args.sockets} sockets x {args.messages} messages; legacy views {args.view_s} s "
        f"(+{args.cpu_ms} ms CPU), WSGI_THREADS={args.threads}"
    )
    header = ["legacy clients", "TTFD p50", "TTFD p99", "TTFD max", "legacy served (p50)"]
    print("| " + " | ".join([*header, "machine busy", "load 1 min"]) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        legacy = (
            f"{row['legacy_served']} ({row['legacy_p50_s']:.1f} s)"
            if row["legacy_clients"]
            else "-"
        )
        ttfd = " | ".join(f"{row[f'ttfd_{p}_ms']:.0f} ms" for p in ("p50", "p99", "max"))
        print(
            f"| {row['legacy_clients']} | {ttfd} | {legacy} | {row['machine_busy_cores']:.2f} "
            f"cores | {row['loadavg_1m_before']:.2f} -> {row['loadavg_1m_after']:.2f} |"
        )
    for base, loaded in zip(rows[::2], rows[1::2], strict=True):
        added = loaded["ttfd_p99_ms"] - base["ttfd_p99_ms"]
        print(f"p99 TTFD added by the legacy load: {added:+.0f} ms")


if __name__ == "__main__":
    main()
