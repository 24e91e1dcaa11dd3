"""Real processes for end-to-end tests: chatbot servers, the fake OpenAI server, redis-server
(one, or a Redis Cluster of them).

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest
import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0


_issued: set[int] = set()  # never the same port twice: a server binds it only later


def free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _issued:
            _issued.add(port)
            return port


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


def tcp_sockets(port: int, peer_port: int) -> list[str]:
    """The inodes of the sockets a process holds with local `port` and remote `peer_port`
    (Linux: /proc/net/tcp*); `[]` once that end has closed it (what the kernel alone keeps
    afterwards, TIME_WAIT for one, has inode 0)."""
    inodes = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
            if (local, remote) == (port, peer_port) and fields[9] != "0":
                inodes.append(fields[9])
    return inodes


def serving_pid(pids: list[int], port: int, peer_port: int) -> int | None:
    """Which of `pids` holds the server end (local `port`) of the TCP connection from the
    client port `peer_port` (Linux: /proc/net/tcp* for the socket, /proc/PID/fd for its owner)."""
    inodes = {f"socket:[{inode}]" for inode in tcp_sockets(port, peer_port)}
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


CLUSTER_NODE_TIMEOUT_MS = 1000
CLUSTER_POLL_S = 0.05


@dataclass(frozen=True)
class ClusterNodeView:
    """One line of `CLUSTER NODES`: a node as some node of the cluster sees it."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str | None  # a replica's master
    slots: frozenset[int]  # the slots it serves (a slot being moved stays its owner's)

    @classmethod
    def parse(cls, line: str) -> ClusterNodeView:
        fields = line.split()
        slots: set[int] = set()
        for item in fields[8:]:
            if not item.startswith("["):  # "[slot->-id]", "[slot-<-id]": a move in progress
                first, _, last = item.partition("-")
                slots.update(range(int(first), int(last or first) + 1))
        address = fields[1].split("@")[0]
        return cls(
            id=fields[0],
            port=int(address.rsplit(":", 1)[1] or 0),
            flags=frozenset(fields[2].split(",")),
            master_id=None if fields[3] == "-" else fields[3],
            slots=frozenset(slots),
        )

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


class RedisClusterNode(RedisProcess):
    """One redis-server of a `RedisClusterProcess`: cluster mode, its own node file and bus port.

    Started again on the same ports it reads its node file and rejoins as the same node: a master
    whose replica took over comes back as that replica's replica.
    """

    def __init__(self, *, node_timeout_ms: int, durable: bool) -> None:
        super().__init__(durable=durable)
        self.name = f"redis-{self.port}"
        self.bus_port = free_port()  # not port + 10000, which may be taken or past 65535
        self.id = ""  # the node's id in the cluster, known once the cluster is created
        options = {
            "cluster-enabled": "yes",
            "cluster-config-file": str(Path(self.dir) / "nodes.conf"),
            "cluster-port": str(self.bus_port),
            "cluster-node-timeout": str(node_timeout_ms),
            # The shards that are up keep serving while another is down.
            "cluster-require-full-coverage": "no",
            # A replica may take over however long ago it last heard from its master.
            "cluster-replica-validity-factor": "0",
            # A replica (re)syncs at once, not 5 s later (Redis waits for more replicas to join).
            "repl-diskless-sync-delay": "0",
        }
        for option, value in options.items():
            self.argv += [f"--{option}", value]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, *args: str | int) -> Any:
        """One command to this node alone (no redirection), on a connection of its own."""
        with redis.Redis(
            host="127.0.0.1",
            port=self.port,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=2,
        ) as client:
            return client.execute_command(*args)

    def view(self) -> dict[str, ClusterNodeView]:
        """The cluster as this node sees it, by node id."""
        lines = str(self.command("CLUSTER", "NODES")).splitlines()
        return {view.id: view for view in map(ClusterNodeView.parse, lines)}

    def info(self, section: str = "CLUSTER") -> dict[str, str]:
        """`CLUSTER INFO`, or the `INFO` section named."""
        if section != "CLUSTER":  # redis-py parses INFO
            return {key: str(value) for key, value in self.command("INFO", section).items()}
        text = str(self.command("CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class RedisClusterProcess:
    """A local Redis Cluster: `masters` shards of one master and `replicas` replicas each (3 and 1:
    six redis-server processes), created with `redis-cli --cluster create` as an operator would.

    `url` is the product's REDIS_URL for it. The helpers do to the cluster what the tests need:
    kill a master and wait for a replica to take over, restart a node, move slots with their keys
    while clients use them. Every wait has a deadline and fails with what it last saw.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS,
        durable: bool = False,
    ) -> None:
        self.cli = require_executable("redis-cli", package="redis-tools")
        self.replicas_per_master = replicas
        self.nodes = [
            RedisClusterNode(node_timeout_ms=node_timeout_ms, durable=durable)
            for _ in range(masters * (1 + replicas))
        ]
        self.failed: RedisClusterNode | None = None  # the master `kill_master` killed
        self.failed_slots: frozenset[int] = frozenset()

    @property
    def url(self) -> str:
        """REDIS_URL for the product: every node, as a client would list its seed nodes."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    @property
    def pids(self) -> list[int]:
        return [node.pid for node in self.nodes if node.running]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> Self:
        """Start every node, create the cluster, wait until it is healthy (`problems`)."""
        try:
            for node in self.nodes:
                node.start()
            argv = [self.cli, "--cluster", "create", *(node.address for node in self.nodes)]
            argv += ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
            created = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                stdin=subprocess.DEVNULL,
                check=False,
            )
            if created.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed:\n{created.stdout}{created.stderr}")
            for node in self.nodes:
                node.id = str(node.command("CLUSTER", "MYID"))
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        for node in self.nodes:
            shutil.rmtree(node.dir, ignore_errors=True)

    # The topology, as the running nodes see it (they agree when `problems` finds none).

    def _view(self) -> dict[str, ClusterNodeView]:
        errors = []
        for node in self.nodes:
            if node.running:
                try:
                    return node.view()
                except redis.RedisError as exc:
                    errors.append(f"{node.address}: {exc!r}")
        raise RuntimeError(f"no node of the cluster answers: {errors}")

    def node(self, node_id: str) -> RedisClusterNode:
        return next(node for node in self.nodes if node.id == node_id)

    @property
    def masters(self) -> list[RedisClusterNode]:
        """The running masters that serve slots."""
        view = self._view()
        ids = {v.id for v in view.values() if "master" in v.flags and v.slots}
        return [node for node in self.nodes if node.running and node.id in ids]

    def flush(self) -> None:
        """Empty every master (a test's fresh start on the session-wide cluster)."""
        for master in self.masters:
            master.command("FLUSHALL")

    @property
    def replicas(self) -> list[RedisClusterNode]:
        view = self._view()
        ids = {v.id for v in view.values() if "slave" in v.flags and not v.failing}
        return [node for node in self.nodes if node.running and node.id in ids]

    def replicas_of(self, master: RedisClusterNode) -> list[RedisClusterNode]:
        view = self._view()
        ids = {v.id for v in view.values() if v.master_id == master.id and not v.failing}
        return [node for node in self.nodes if node.running and node.id in ids]

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        """The hash slot of `key` (of its `{tag}` when it has one)."""
        return key_slot(key.encode() if isinstance(key, str) else key)

    def node_of_slot(self, slot: int) -> RedisClusterNode:
        """The master serving `slot`."""
        owner = next(v.id for v in self._view().values() if slot in v.slots)
        return self.node(owner)

    # Health.

    def problems(self) -> list[str]:
        """What keeps the cluster from being whole and settled (nothing: healthy). Every running
        node says `cluster_state:ok` with all 16384 slots served, they agree on which master
        serves which slots, each of those masters is running, and each replica's link to its
        master is up (it can take over)."""
        running = [node for node in self.nodes if node.running]
        ids = {node.id for node in running}
        found: list[str] = []
        layouts = set()
        for node in running:
            try:
                info, view = node.info(), node.view()
                if "slave" in view[node.id].flags:
                    link = node.info("replication").get("master_link_status")
                    if link != "up":
                        found.append(f"{node.address}: replica's link to its master is {link}")
            except redis.RedisError as exc:
                found.append(f"{node.address}: {exc!r}")
                continue
            if info.get("cluster_state") != "ok":
                found.append(f"{node.address}: cluster_state:{info.get('cluster_state')}")
            if info.get("cluster_slots_ok") != str(REDIS_CLUSTER_HASH_SLOTS):
                found.append(f"{node.address}: cluster_slots_ok:{info.get('cluster_slots_ok')}")
            owners = {v.id: v.slots for v in view.values() if v.slots}
            if sum(map(len, owners.values())) != REDIS_CLUSTER_HASH_SLOTS:
                found.append(f"{node.address}: sees {sum(map(len, owners.values()))} slots")
            if down := [v.port for v in view.values() if v.id in owners and v.id not in ids]:
                found.append(f"{node.address}: sees slots served by nodes that are down: {down}")
            if failing := [v.port for v in view.values() if v.id in ids and v.failing]:
                found.append(f"{node.address}: sees running nodes as failing: {failing}")
            layouts.add(frozenset(owners.items()))
        if len(layouts) > 1:
            found.append(f"the nodes disagree on which master serves which slots ({len(layouts)})")
        return found

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Seconds until `problems` finds none; TimeoutError with the last ones past `timeout_s`."""
        started = time.monotonic()
        while found := self.problems():
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the cluster is not healthy after {timeout_s} s: {found}")
            time.sleep(CLUSTER_POLL_S)
        return time.monotonic() - started

    # What the tests do to the cluster.

    def kill_master(self, node: RedisClusterNode) -> None:
        """kill -9 a master: its shard is down until one of its replicas takes over."""
        view = node.view()[node.id]
        assert "master" in view.flags and view.slots, f"{node.address} is not a serving master"
        self.failed, self.failed_slots = node, view.slots
        node.kill()

    def wait_failover(self, timeout_s: float = START_TIMEOUT_S) -> RedisClusterNode:
        """The replica that took over the slots of the master `kill_master` killed, once the
        cluster is healthy again (every slot served by a running master)."""
        assert self.failed is not None, "kill_master first"
        self.wait_healthy(timeout_s)
        successor = self.node_of_slot(min(self.failed_slots))
        assert successor is not self.failed
        return successor

    def restart(self, node: RedisClusterNode, timeout_s: float = START_TIMEOUT_S) -> None:
        """Kill `node` if it runs, start it again on its ports, wait until the cluster is healthy
        (a node restarted without `durable` has lost its data and syncs it from its master)."""
        node.kill()
        node.start()
        self.wait_healthy(timeout_s)

    def migrate_slots(
        self,
        slots: Iterable[int],
        to: RedisClusterNode,
        *,
        keys_per_call: int = 100,
        after_each_call: Callable[[], None] | None = None,
    ) -> None:
        """Move `slots` with their keys to the master `to`, as `redis-cli --cluster reshard`
        does, while clients keep using them: the target imports the slot and the source migrates
        it (a client is sent ASK for a key already moved, TRYAGAIN for a command on keys split
        between the two), MIGRATE moves the keys `keys_per_call` at a time (`after_each_call`
        runs between the calls, with the slot half moved), then every master learns the new
        owner, and the cluster settles."""
        for slot in sorted(set(slots)):
            source = self.node_of_slot(slot)
            if source is to:
                continue
            to.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
            source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", to.id)
            while keys := source.command("CLUSTER", "GETKEYSINSLOT", slot, keys_per_call):
                source.command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
                if after_each_call is not None:
                    after_each_call()
            others = [master for master in self.masters if master not in (to, source)]
            for node in (to, source, *others):
                node.command("CLUSTER", "SETSLOT", slot, "NODE", to.id)
        self.wait_healthy()


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
