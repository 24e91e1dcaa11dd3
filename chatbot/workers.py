"""`chatbot serve --workers N` (or `WEB_CONCURRENCY=N`): N full instances on one port.

One process serves on one core. With N workers a supervisor starts N `chatbot serve` processes,
each a whole instance (its own broker connections, its own instance id, its own GC and event
loop), and each binds the port itself with SO_REUSEPORT: the kernel spreads new connections over
their listening sockets evenly, where one socket shared by every worker wakes them all on every
connection and lets the least busy one take most of them. Sessions are shared through Redis as
between any instances, so a client may land on any worker; with the in-process broker each worker
would hold its own sessions apart, so N > 1 needs `REDIS_URL`.

The supervisor forwards SIGTERM and SIGINT to every worker, each of which drains as a lone
instance does (1012 to every socket, replies finish within SHUTDOWN_GRACE_S), and exits when
they all have. Heroku sends SIGTERM to every process of the dyno anyway; a second one is
harmless. A worker that dies while the others serve (killed, say by the OOM killer) is started
again, unless it failed during its start-up (a port taken, Redis refusing it), which would only
repeat: then everything stops with its exit status. Should the supervisor itself be killed, the
kernel sends each worker SIGTERM (Linux's parent-death signal), so none serves on orphaned.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger("chatbot.workers")

# A worker that exits with an error sooner than this after its start failed to start.
START_UP_S = 10.0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket that other workers may bind too."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host.strip("[]"), port))
    sock.setblocking(False)
    return sock


def _die_with_parent() -> None:
    """In a worker before it runs: SIGTERM when the supervisor dies (Linux; elsewhere nothing)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def supervise(workers: int, argv: Sequence[str]) -> int:
    """Run `workers` copies of `chatbot <argv> --workers 1 --reuse-port` until they all exit;
    return 0 if every one stopped cleanly, else the first failure's exit status."""
    command = [sys.executable, "-m", "chatbot", *argv, "--workers", "1", "--reuse-port"]
    started: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    stopping = False
    status = 0

    def start() -> None:
        # The supervisor runs no threads, so a pre-exec function is safe here.
        process = subprocess.Popen(command, preexec_fn=_die_with_parent)
        started[process.pid] = (process, time.monotonic())
        log.info("worker %d started", process.pid)

    def stop(signum: int, frame: FrameType | None = None) -> None:
        nonlocal stopping
        if not stopping:
            log.info("stopping %d workers", len(started))
        stopping = True
        for pid in started:
            # os.kill, not Popen.send_signal or poll: those reap an exited worker, whose exit
            # the loop below then never sees. A worker not yet reaped takes the signal harmlessly.
            os.kill(pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    for _ in range(workers):
        start()
    log.info("serving with %d workers", workers)
    while started:
        pid, wait_status = os.wait()  # a signal runs `stop` in between (PEP 475)
        if pid not in started:
            continue
        process, since = started.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        process.returncode = code
        if stopping:
            status = status or (code if code > 0 else 0)
            continue
        log.error("worker %d exited with status %d", pid, code)
        if code > 0 and time.monotonic() - since < START_UP_S:  # not killed: it failed
            status = code or 1
            stop(signal.SIGTERM)
        else:
            start()
    return status
