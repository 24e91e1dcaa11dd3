"""What Python work in threads costs an event loop on the same interpreter: the GIL.

    python -m bench.gil_lag

A mounted WSGI_APP runs its views in threads of chatbot's process (chatbot/mount.py). A view
that blocks (sleep, a socket, a database) releases the GIL; its Python work (routing, templates,
JSON) holds it, and the event loop that streams every chat waits for its turn. This measures the
loop's lag (how late a 2 ms sleep wakes) while N threads each do `--cpu-ms` of Python work
together every 200 ms, as legacy views finishing together do, for a few thread counts and GIL
switch intervals (`sys.setswitchinterval`). Pinned to one CPU, like the server in bench.run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time

from .report import percentile


def _views(stop: threading.Event, together: threading.Barrier, cpu_ms: float) -> None:
    while not stop.is_set():
        try:
            together.wait(timeout=5)
        except threading.BrokenBarrierError:
            return
        busy_until = time.thread_time() + cpu_ms / 1000
        while time.thread_time() < busy_until:
            sum(range(300))
        time.sleep(0.2)  # the view's blocking call: the GIL is free


async def _loop_lag(duration_s: float) -> list[float]:
    lags = []
    loop = asyncio.get_running_loop()
    end = loop.time() + duration_s
    while loop.time() < end:
        started = time.perf_counter()
        await asyncio.sleep(0.002)
        lags.append(time.perf_counter() - started - 0.002)
    return lags


def measure(threads: int, cpu_ms: float, interval_s: float, duration_s: float) -> list[float]:
    sys.setswitchinterval(interval_s)
    stop, together = threading.Event(), threading.Barrier(threads)
    workers = [
        threading.Thread(target=_views, args=(stop, together, cpu_ms), daemon=True)
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    try:
        return asyncio.run(_loop_lag(duration_s))
    finally:
        stop.set()
        together.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-ms", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    print(f"threads x {args.cpu_ms} ms of Python work together every 200 ms; loop lag in ms")
    print("| threads | switch interval | lag p50 | lag p99 | lag max |")
    print("| --- | --- | --- | --- | --- |")
    for _ in range(args.repeat):
        for threads, interval_s in ((0, 0.005), (4, 0.005), (16, 0.005), (16, 0.0005), (16, 0.05)):
            if threads:
                lags = measure(threads, args.cpu_ms, interval_s, args.seconds)
            else:
                lags = asyncio.run(_loop_lag(args.seconds))
            p50, p99 = (1000 * (percentile(lags, p) or 0) for p in (50, 99))
            print(
                f"| {threads} | {interval_s * 1000:g} ms | {p50:.2f} | {p99:.2f} "
                f"| {1000 * max(lags):.1f} |"
            )


if __name__ == "__main__":
    main()
