"""Redis memory per session, measured: N sessions of a typical size through the real service.

    python -m bench.redis_memory [--sessions 1000] [--turns 4] [--chunks 100]

Starts a throwaway redis-server, runs `--sessions` conversations of `--turns` turns each through
`ChatService` (Redis broker, the fake model in-process: each reply `--chunks` pieces of about 7
characters), then reads Redis's own accounting: `INFO memory` (used_memory before and after, so
the server's fixed overhead is left out) and `MEMORY USAGE` of each key of one session. What a
session costs is what stays in Redis for SESSION_TTL_S after its last event (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import redis.asyncio as aioredis

from chatbot.chat.service import ChatService
from chatbot.fake_openai import FakeOpenAI
from chatbot.settings import Settings

from .procs import Server, free_port


async def _conversation(service: ChatService, n: int, turns: int) -> None:
    session, _ = await service.open_session(None)
    for turn in range(turns):
        async with service.broker.subscribe(session) as sub:
            await service.submit(session, f"question {turn} of conversation {n}, " * 3)
            while True:  # until this reply's `done`
                item = await sub.get()
                if getattr(item, "data", {}).get("type") == "done":
                    break


async def _measure(args: argparse.Namespace, redis_url: str) -> None:
    async with FakeOpenAI(ttft_ms=0, chunks=args.chunks, interval_ms=args.interval_ms) as fake:
        settings = Settings(
            redis_url=redis_url,
            openai_base_url=fake.base_url,
            openai_api_key="sk-bench",
            rate_limit_ip="1000000/minute",
            rate_limit_new_sessions="1000000/minute",
        )
        service = await ChatService.open(settings)
        async with aioredis.from_url(redis_url, decode_responses=True) as admin:
            await asyncio.sleep(1)  # the broker's first calls (epoch, liveness, scripts)
            before = (await admin.info("memory"))["used_memory"]
            keys_before = await admin.dbsize()
            limit = asyncio.Semaphore(50)

            async def one(n: int) -> None:
                async with limit:
                    await _conversation(service, n, args.turns)

            await asyncio.gather(*(one(n) for n in range(args.sessions)))
            await asyncio.sleep(0.5)
            after = (await admin.info("memory"))["used_memory"]
            keys = await admin.dbsize() - keys_before
            by_kind: dict[str, int] = defaultdict(int)
            sample = None
            async for key in admin.scan_iter("chatbot:s:*:meta", count=1000):
                sample = key.split(":")[2]
                break
            assert sample is not None
            events = await admin.xlen(f"chatbot:s:{sample}:log")
            async for key in admin.scan_iter(f"*{sample}*"):
                kind = key.replace(sample, "{id}")
                by_kind[kind] += await admin.memory_usage(key, samples=0) or 0
        await service.close()
    per_session = (after - before) / args.sessions
    print(f"{args.sessions} sessions x {args.turns} turns, replies of {args.chunks} pieces")
    print(f"  INFO memory used_memory: +{after - before:,} bytes, {keys:,} keys")
    print(f"  per session: {per_session:,.0f} bytes ({per_session / args.turns:,.0f} per turn)")
    print(f"  MEMORY USAGE of one session's keys ({events} events in its log):")
    for kind, size in sorted(by_kind.items()):
        print(f"    {kind:<48} {size:>8,} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=100, help="pieces per reply")
    parser.add_argument(
        "--interval-ms",
        type=int,
        default=2,
        help="between pieces (0 merges them into fewer deltas)",
    )
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-redis-memory-"))
    redis = Server("redis", argv, port=port, log_dir=log_dir, health_path=None).start()
    try:
        asyncio.run(_measure(args, f"redis://127.0.0.1:{port}/0"))
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
