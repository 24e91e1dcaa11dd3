"""Real processes for end-to-end tests: chatbot servers, the fake OpenAI server, redis-server.

Each starts on a free port, waits for its own readiness signal (with a deadline), keeps its output
in a log file for failure reports, and can be killed (-9), terminated or restarted by the test.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Self

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_executable(name: str, *, package: str) -> str:
    """The path of `name`; skip when missing, but fail under CI, where nothing may be skipped."""
    path = shutil.which(name) or (name if os.path.exists(name) else None)
    if path:
        return path
    message = f"{name} is not installed (Debian package {package}; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"port {port} did not open in {timeout_s} s:\n{log.read_text()[-3000:]}")


class Process:
    """A child process with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.argv = argv
        self.cwd = cwd
        self.env = {**os.environ, **(env or {})}
        self.log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    # `ulimit -n` of the process, when a test runs it short of descriptors.
    max_descriptors: int | None = None

    def spawn(self) -> None:
        limit = self.max_descriptors

        def limit_descriptors() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                preexec_fn=limit_descriptors,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the process dies without any chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait for the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class ChatbotProcess(Process):
    """`python -m chatbot serve ARGS` on 127.0.0.1:port with the given environment, run in
    `cwd` (where an app argument and `WSGI_APP` are looked up)."""

    def __init__(
        self,
        env: dict[str, str],
        port: int | None = None,
        name: str = "chatbot",
        args: tuple[str, ...] = (),
        cwd: Path = ROOT,
    ):
        self.port = port or free_port()
        env = {"PORT": str(self.port), "HOST": "127.0.0.1", "LOG_LEVEL": "INFO", **env}
        super().__init__(name, [sys.executable, "-m", "chatbot", "serve", *args], env, cwd)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> ChatbotProcess:
        self.spawn()
        assert self.proc is not None
        _wait_port(self.port, self.proc, self.log, START_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:  # the port opens before before_serving completes
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"{self.name} not healthy:\n{self.output()[-3000:]}")


def children(pid: int) -> list[int]:
    """The processes `pid` started (Linux)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def serving_pid(pids: list[int], port: int, peer_port: int) -> int | None:
    """Which of `pids` holds the server end (local `port`) of the TCP connection from the
    client port `peer_port` (Linux: /proc/net/tcp* for the socket, /proc/PID/fd for its owner)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
            if (local, remote) == (port, peer_port):
                inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:  # closed meanwhile
                continue
    return None


class FakeOpenAIProcess(Process):
    """`python -m chatbot.fake_openai` on a free port."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "chatbot.fake_openai", "--port", str(self.port), *args]
        super().__init__("fake-openai", argv)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIProcess:
        self.spawn()
        assert self.proc is not None
        _wait_port(self.port, self.proc, self.log, START_TIMEOUT_S)
        return self


class RedisProcess(Process):
    """A throwaway redis-server, restartable on the same port.

    `durable` keeps an fsync-always append-only file, like a production Redis that survives a
    restart with its data; otherwise it keeps nothing on disk.
    """

    def __init__(self, port: int | None = None, *, durable: bool = False) -> None:
        binary = require_executable("redis-server", package="redis-server")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-")
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--dir", self.dir, "--appendonly", "yes" if durable else "no"]
        if durable:
            argv += ["--appendfsync", "always"]
        super().__init__("redis", argv)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.spawn()
        assert self.proc is not None
        _wait_port(self.port, self.proc, self.log, START_TIMEOUT_S)
        return self

    def restart(self) -> None:
        """Kill and start again on the same port: every connection drops and all data is gone."""
        self.kill()
        self.start()


class BalancerProcess(Process):
    """A load balancer in front of chatbot instances, listening on `self.port`."""

    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.spawn()
        assert self.proc is not None
        _wait_port(self.port, self.proc, self.log, START_TIMEOUT_S)
        return self


class HAProxyProcess(BalancerProcess):
    """HAProxy running the shipped config (docs/deploy/haproxy.cfg) in front of the instances."""

    CONFIG = ROOT / "docs" / "deploy" / "haproxy.cfg"

    def __init__(self, backends: list[int]) -> None:
        binary = require_executable("haproxy", package="haproxy")
        self.port = free_port()
        env = {"CHATBOT_LB": f"127.0.0.1:{self.port}"}
        env |= {f"CHATBOT_{n}": f"127.0.0.1:{port}" for n, port in enumerate(backends, 1)}
        super().__init__("haproxy", [binary, "-db", "-f", str(self.CONFIG)], env)


class NginxProcess(BalancerProcess):
    """nginx running the shipped config (docs/deploy/nginx.conf), its `listen` port and upstream
    servers replaced with the test's."""

    CONFIG = ROOT / "docs" / "deploy" / "nginx.conf"

    def __init__(self, backends: list[int]) -> None:
        binary = require_executable("nginx", package="nginx")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="nginx-")
        config = self.CONFIG.read_text()
        config = re.sub(r"listen \S+;", f"listen 127.0.0.1:{self.port};", config)
        servers = re.findall(r"^ *server 127\.0\.0\.1:\d+ .*;$", config, flags=re.M)
        ours = [re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", servers[0]) for port in backends]
        config = config.replace("\n".join(servers), "\n".join(ours))
        path = Path(self.dir) / "nginx.conf"
        path.write_text(config)
        directives = "daemon off; master_process off; pid nginx.pid; error_log stderr notice;"
        super().__init__("nginx", [binary, "-p", self.dir, "-c", str(path), "-g", directives])
