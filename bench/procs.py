"""Server processes for the benchmark and what they cost: CPU time and memory from /proc.

Every server starts in its own process group on a free loopback port, optionally pinned to a set
of CPUs, with its output in a log file, and is stopped by its own id (SIGTERM, then SIGKILL to its
process group).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Added to the niceness of every process the benchmark starts (bench.run --nice).
NICE = 0


def _child_setup(cpus: frozenset[int] | None) -> None:
    """Runs in the child before exec: pin it, give it the benchmark's priority, and let it open
    as many sockets as allowed."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    if NICE:
        os.nice(NICE)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Server:
    """One server process (and its children, e.g. gunicorn workers)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        port: int,
        log_dir: Path,
        env: dict[str, str] | None = None,
        cpus: frozenset[int] | None = None,
        health_path: str | None = "/healthz",
    ) -> None:
        self.name, self.argv, self.port, self.cpus = name, argv, port, cpus
        self.env = {**os.environ, **(env or {})}
        self.health_path = health_path
        self.log = log_dir / f"{name}-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = START_TIMEOUT_S, answer_timeout_s: float = 2.0) -> Server:
        """Start it and wait up to `timeout_s` until it answers (its health path within
        `answer_timeout_s`, when it has one)."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: _child_setup(self.cpus),
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            if self._answers(answer_timeout_s):
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} did not start in {timeout_s} s:\n{self.tail()}")

    def _answers(self, timeout_s: float) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
            if self.health_path is None:
                return True
            url = f"http://127.0.0.1:{self.port}{self.health_path}"
            with urllib.request.urlopen(url, timeout=timeout_s) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        try:  # the group: workers a master left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def usage(self) -> Usage:
        return Usage.of_tree(self.pid)


class Servers:
    """Several servers measured as one (bench.run's pair systems): their usage added up."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers
        self.name = "+".join(server.name for server in servers)

    @property
    def pid(self) -> int:
        return self.servers[0].pid

    def usage(self) -> Usage:
        parts = [server.usage() for server in self.servers]
        return Usage(
            cpu_s=sum(u.cpu_s for u in parts),
            peak_rss=sum(u.peak_rss for u in parts),
            rss=sum(u.rss for u in parts),
            processes=sum(u.processes for u in parts),
        )

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user+system, live children included, reaped ones via cutime/cstime), the
    peak resident set (VmHWM, summed over the tree) and the current one (VmRSS), in bytes."""

    cpu_s: float
    peak_rss: int
    rss: int
    processes: int

    @classmethod
    def of_tree(cls, pid: int) -> Usage:
        return cls.of_pids([pid, *descendants(pid)], reaped_of=pid)

    @classmethod
    def of_pids(cls, pids: Iterable[int], reaped_of: int | None = None) -> Usage:
        cpu = peak = rss = count = 0.0
        for pid in pids:
            try:
                fields = _stat_fields(pid)
                status = _status(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            ticks = int(fields[13]) + int(fields[14])  # utime, stime
            if pid == reaped_of:
                ticks += int(fields[15]) + int(fields[16])  # cutime, cstime: reaped children
            cpu += ticks / CLOCK_TICKS
            peak += status.get("VmHWM", 0)
            rss += status.get("VmRSS", 0)
            count += 1
        return cls(cpu_s=cpu, peak_rss=int(peak), rss=int(rss), processes=int(count))


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name is in parentheses and may contain spaces: split after its closing one.
    return [
        str(pid),
        raw[raw.index("(") : raw.rindex(")") + 1],
        *raw[raw.rindex(")") + 2 :].split(),
    ]


def _status(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[3])
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def machine_busy_s() -> float:
    """CPU seconds every core of the machine has spent busy (not idle or waiting) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS  # user..steal; guest is inside user


def chatbot_env(port: int, fake_port: int, **extra: str) -> dict[str, str]:
    """`chatbot serve`'s environment on 127.0.0.1:port against the fake upstream on fake_port,
    with the in-process broker."""
    return {
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{fake_port}/v1",
        "OPENAI_API_KEY": "",
        "REDIS_URL": "",
        **extra,
    }


def python() -> str:
    return sys.executable


class CpuShares:
    """A CPU quota per process through the kernel's CFS bandwidth control: `confine(pid)` puts
    a process in a cgroup of its own that may run `cores` of a core (e.g. 0.4) however idle the
    machine is, so N processes can be given N equal "cores" on a machine that also runs their
    load generator (bench.run --core-share). The period is short (10 ms), so a throttled process
    waits at most a few ms at a time. cgroup v1's cpu controller, or v2's where it is enabled;
    root only."""

    PERIOD_US = 10_000

    def __init__(self, cores: float, name: str) -> None:
        if not 0 < cores <= len(os.sched_getaffinity(0)):
            raise ValueError(f"a core share must be in (0, cpus], not {cores}")
        self.cores = cores
        v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
        if (v1 / "cpu.cfs_quota_us").exists():
            self.v2, self.root = False, v1 / name
        elif "cpu" in (v2 / "cgroup.controllers").read_text(errors="replace").split():
            self.v2, self.root = True, v2 / name
        else:
            raise RuntimeError("no cgroup cpu controller (CFS bandwidth) on this machine")
        self.root.mkdir(exist_ok=True)
        if self.v2:
            (self.root / "cgroup.subtree_control").write_text("+cpu")
        self.groups: list[Path] = []
        self.pids: list[int] = []

    def confine(self, pid: int) -> None:
        group = self.root / f"p{pid}"
        group.mkdir(exist_ok=True)
        quota = int(self.cores * self.PERIOD_US)
        if self.v2:
            (group / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(pid))
        self.groups.append(group)
        self.pids.append(pid)

    def cpu_s(self) -> list[float]:
        """CPU seconds of each confined process so far, in the order they were confined."""
        return [Usage.of_pids([pid]).cpu_s for pid in self.pids]

    def throttled_s(self) -> float:
        """Seconds the confined processes were held back by their quota, added up."""
        total = 0.0
        for group in self.groups:
            stat = dict(
                line.split() for line in (group / "cpu.stat").read_text().splitlines() if line
            )
            if self.v2:
                total += int(stat.get("throttled_usec", 0)) / 1e6
            else:
                total += int(stat.get("throttled_time", 0)) / 1e9
        return total

    def release(self) -> None:
        """Remove the groups (their processes have exited or are moved back to the root)."""
        parent = self.root.parent / "cgroup.procs"
        for group in self.groups:
            try:
                for pid in (group / "cgroup.procs").read_text().split():
                    parent.write_text(pid)
                group.rmdir()
            except OSError:
                pass
        self.groups.clear()
        self.pids.clear()

    def close(self) -> None:
        self.release()
        try:
            self.root.rmdir()
        except OSError:
            pass
