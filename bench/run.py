"""Run the whole benchmark on this machine and write the report.

    python -m bench.run            # the full run (10-15 minutes), writes docs/benchmarks.md
    python -m bench.run --quick    # a small smoke version (under a minute), writes to /tmp

Every scenario starts its server afresh (so peak RSS is per scenario), against a fake OpenAI
server (`chatbot.fake_openai`) that runs for the whole run, one per reply shape:

- realistic: 300 ms to the first token, then 20 chunks 100 ms apart (about 2.2 s a reply);
- token-rate: 300 ms, then 100 chunks 20 ms apart.

Systems: ``upstream`` (no server: the load generator streams from the fake directly), ``flask``
(`bench.flask_app` under ``gunicorn -w 4``, HTTP only), ``chatbot`` (one Hypercorn process,
in-process broker), ``chatbot-redis`` (the same with REDIS_URL on the local redis-server, a
dedicated db flushed before each scenario), ``peer`` (`bench.fastapi_peer` on uvicorn) and
``floor`` (`bench.floor`: a bare relay on chatbot's own stack, the least it can cost). Beside
them: ``chatbot-https`` (the upstream over https with a throwaway self-signed certificate,
trusted through SSL_CERT_FILE; the pool stays warm), ``chatbot-https-cold`` (the same upstream
answering `Connection: close`, so every reply opens a TCP + TLS connection) and ``chatbot-2w``
(``--workers 2`` with Redis, not pinned: its workers share both cores with the load generator).
Past one Redis (`bench/redis_budget.py`, docs/scaling.md): ``chatbot-pair-redis`` is two
instances (both on the server's CPU) against a fresh redis-server, each session with a socket on
each instance, so every event is published from the instance that writes it to the other;
``chatbot-pair-cluster`` is the same against a fresh Redis Cluster of 3 masters with a replica
each. Their rows carry what Redis did meanwhile, by its own accounting: calls by command,
publishes, bytes, memory, and each master's CPU seconds (redis-servers are not pinned).

    python -m bench.run --only chatbot:steady:1000 --only chatbot-https:steady:100

runs just those scenarios (``SYSTEM:PATTERN:N[:SHAPE]``), prints their rows and writes them as
JSON, not the report. Every chatbot row carries the worst GC pause the server's `/metrics`
recorded (`chatbot_gc_pause_max_seconds`, wall clock and CPU, and the young generation's) and
the upstream connections the fake accepted during the load.

By default the server under test is pinned to CPU 0 and the fake upstream and load generator to
the other CPUs, so the server has a core of its own, as it would in production, and the client
side cannot steal from it. Every load is bounded in sessions and time; see bench/loadgen.py.

    python -m bench.run --core-share 0.5 --repeat 3 \
        --only chatbot-redis:steady:120 --only chatbot-2w:steady:240

gives each server process (each worker of ``chatbot-2w``, each instance of a pair) half a core
by a CFS quota instead of pinning anything: two workers get two such "cores", one process one,
and the load generator, the fake and Redis run beside them on what is left, so a machine with as
few as 2 cores can show what a second worker adds without the client side taking its core.
``--repeat`` runs the list that many times, interleaved, and judges each level by its median
run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import selectors
import shlex
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatbot.fake_openai import self_signed_certificate

from . import procs
from .procs import (
    ROOT,
    CpuShares,
    Server,
    Servers,
    Usage,
    descendants,
    free_port,
    machine_busy_s,
    python,
)
from .redis_budget import PAIRS, Store, snapshot, start_store, window
from .report import (
    HOLD_P99_OVERHEAD_S,
    Report,
    holds,
    keep_analysis,
    machine,
    merge,
    now,
    source_digest,
    summarize,
)

SHAPES = {
    # name: (ttft ms, chunks, interval ms)
    "realistic": (300, 20, 100),
    "token-rate": (300, 100, 20),
}
DEFAULT_LEVELS = (100, 1000)
DEFAULT_LADDER = (20, 30, 50, 70, 150, 200, 300, 500, 700, 1500, 2000, 3000, 4000, 5000)
REDIS_DB = 13
HTTPS = ("chatbot-https", "chatbot-https-cold")
WORKERS = {"chatbot-2w": 2}
GC_SCRAPES = 8  # a `--workers` server answers /metrics from any worker: ask a few times


# --quick: the same first-token time, fewer chunks, so a reply takes well under a second.
QUICK_SHAPES = {"realistic": (300, 6, 100), "token-rate": (300, 20, 20)}


def reply_s(shape: tuple[int, int, int]) -> float:
    ttft, chunks, interval = shape
    return (ttft + (chunks - 1) * interval) / 1000


@dataclass(frozen=True)
class Scenario:
    system: str  # upstream, flask, chatbot, chatbot-redis, peer
    mode: str  # ws, http, upstream, idle
    pattern: str  # burst, steady, idle
    n: int
    shape: str = "realistic"
    messages: int = 1
    compression: str = "deflate"  # what the client offers
    server_deflate: bool = False  # chatbot: WS_PERMESSAGE_DEFLATE=true (it declines by default)

    def label(self) -> str:
        extra = "" if self.compression == "deflate" else " no-deflate"
        extra += " server-deflate" if self.server_deflate else ""
        return f"{self.system} {self.mode}/{self.pattern} {self.shape} N={self.n}{extra}"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        procs.NICE = args.nice
        self.run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
        cpus = sorted(os.sched_getaffinity(0))
        pin = not args.no_pin and not args.core_share and len(cpus) >= 2
        self.server_cpus = frozenset(cpus[:1]) if pin else None
        self.client_cpus = frozenset(cpus[1:]) if pin else None
        self.shapes = QUICK_SHAPES if args.quick else SHAPES
        self.fakes: dict[str, Server] = {}
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.failures = 0  # scenarios that could not be measured (the exit status says so)
        self.started = time.monotonic()
        self.redis_ok = self._redis_available()
        self.digest = source_digest()
        self.profile: tuple[Path, int, int] | None = None  # (raw output, seconds, rate)
        self.store: Store | None = None  # the fresh Redis of a pair system's scenario
        # --core-share: each server process gets that much of a core, by quota, not a pin.
        self.shares = (
            CpuShares(args.core_share, f"chatbot-bench-{os.getpid()}") if args.core_share else None
        )

    # -- processes --------------------------------------------------------------------------------

    @property
    def certificate(self) -> Path:
        """The https upstream's certificate (made once per run; its key beside it)."""
        cert = self.run_dir / "cert.pem"
        if not cert.exists():
            self_signed_certificate(self.run_dir)
        return cert

    def fake(self, shape: str, tls: bool = False) -> Server:
        key = f"{shape}-tls" if tls else shape
        if key not in self.fakes:
            ttft, chunks, interval = self.shapes[shape]
            port = free_port()
            argv = [python(), "-m", "chatbot.fake_openai", "--port", str(port)]
            if tls:
                argv += ["--tls-cert", str(self.certificate)]
                argv += ["--tls-key", str(self.run_dir / "key.pem")]
            argv += [
                "--ttft-ms",
                str(ttft),
                "--chunks",
                str(chunks),
                "--interval-ms",
                str(interval),
            ]
            server = Server(
                f"fake-{key}",
                argv,
                port=port,
                log_dir=self.run_dir,
                cpus=self.client_cpus,
                health_path=None if tls else "/v1/models",  # it listens once it serves
            )
            self.fakes[key] = server.start()
        return self.fakes[key]

    def fake_call(self, fake: Server, path: str, body: dict[str, Any] | None = None) -> Any:
        """A control call (`/_fake/...`) to `fake`, over https when it serves https."""
        tls = fake.name.endswith("-tls")
        url = f"{'https' if tls else 'http'}://127.0.0.1:{fake.port}{path}"
        data = None if body is None else json.dumps(body).encode()
        context = ssl.create_default_context(cafile=self.certificate) if tls else None
        request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
        with urllib.request.urlopen(request, timeout=5, context=context) as reply:
            return json.loads(reply.read())

    def server(
        self, system: str, fake: Server, port: int, deflate: bool = False, port_b: int = 0
    ) -> Server | Servers | None:
        scheme = "https" if system in HTTPS else "http"
        upstream = {
            "OPENAI_BASE_URL": f"{scheme}://127.0.0.1:{fake.port}/v1",
            "OPENAI_API_KEY": "sk-bench",
        }
        common = {"log_dir": self.run_dir, "port": port, "cpus": self.server_cpus}
        if system == "upstream":
            return None
        if system == "flask":
            argv = [python(), "-m", "gunicorn", "-w", "4", "-b", f"127.0.0.1:{port}"]
            argv += ["--backlog", "2048", "bench.flask_app:app"]
            return Server("flask", argv, env=upstream, health_path="/", **common).start()
        if system.startswith("chatbot"):
            env = {**upstream, "HOST": "127.0.0.1", "PORT": str(port), "SHUTDOWN_GRACE_S": "2"}
            if deflate:
                env["WS_PERMESSAGE_DEFLATE"] = "true"
            if system in HTTPS:
                env["SSL_CERT_FILE"] = str(self.certificate)
            if system == "chatbot-redis" or system in WORKERS:
                env["REDIS_URL"] = f"redis://127.0.0.1:6379/{REDIS_DB}"
                self._flush_redis()
            argv = [python(), "-m", "chatbot", "serve"]
            if system in PAIRS:
                assert self.store is not None
                env["REDIS_URL"] = self.store.url
                pair = []
                for name, p in ((f"{system}-a", port), (f"{system}-b", port_b)):
                    pair.append(
                        Server(name, argv, env={**env, "PORT": str(p)}, **{**common, "port": p})
                    )
                return Servers([server.start() for server in pair])
            if system in WORKERS:  # every core: not pinned to the server's one
                argv += ["--workers", str(WORKERS[system])]
                common["cpus"] = None
            return Server(system, argv, env=env, **common).start()
        if system == "peer":
            argv = [python(), "-m", "uvicorn", "bench.fastapi_peer:app", "--port", str(port)]
            argv += ["--host", "127.0.0.1", "--loop", "uvloop", "--http", "httptools"]
            argv += ["--no-access-log", "--log-level", "warning", "--backlog", "2048"]
            return Server("peer", argv, env=upstream, **common).start()
        if system == "floor":
            argv = [python(), "-m", "bench.floor", "--port", str(port)]
            return Server("floor", argv, env=upstream, **common).start()
        raise ValueError(system)

    def _redis_available(self) -> bool:
        try:
            import redis

            redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=2).ping()
            return True
        except Exception:
            return False

    def _flush_redis(self) -> None:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=5).flushdb()

    def _redis_usage(self) -> Usage | None:
        import redis

        try:
            info = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2).info("server")
            return Usage.of_pids([int(info["process_id"])])
        except Exception:
            return None

    # -- one scenario -----------------------------------------------------------------------------

    def run(self, sc: Scenario) -> dict[str, Any]:
        """Run one scenario and add its row; a scenario that breaks becomes a note. Another
        program busy on this machine meanwhile (over `--max-other-cpu` of a core) spoils the
        numbers: the scenario runs again, once, and its row says how busy the machine was."""
        for attempt in (1, 2):
            try:
                raw, usage = self._drive(sc)
            except Exception as exc:
                self.notes.append(f"{sc.label()}: not measured: {exc}"[:400])
                self.failures += 1
                print(f"bench: {sc.label()} FAILED: {exc}", flush=True)
                return {"holds": False}
            other = usage["other_cpu_s"] / usage["window_s"]
            if other <= self.args.max_other_cpu or attempt == 2:
                break
            print(f"bench: {sc.label()}: other programs used {other:.0%} of a core; again")
            self.notes.append(
                f"{sc.label()}: measured twice, other programs on the machine used {other:.0%} "
                "of a core during the first run"
            )
            time.sleep(2)
        row = summarize(
            {
                "system": sc.system,
                "mode": sc.mode,
                "pattern": sc.pattern,
                "shape": sc.shape,
                "chunks": self.shapes[sc.shape][1],
                "n": sc.n,
                "messages": sc.messages,
                "compression": sc.compression,
                "server_deflate": sc.server_deflate,
            },
            raw,
            usage,
        )
        if sc.pattern == "burst" and sc.mode == "ws":
            row["holds"] = holds(row, self.bare_row(sc.n, sc.shape, sc.pattern))
        self.rows.append(row)
        print(_line(row), flush=True)
        return row

    def _drive(self, sc: Scenario) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start the load generators (they import meanwhile), the server, warm up, sample the
        server's usage, run the load, sample again."""
        if (sc.system == "chatbot-redis" or sc.system in WORKERS) and not self.redis_ok:
            raise RuntimeError("no redis-server answers on 127.0.0.1:6379")
        fake = self.fake(sc.shape, tls=sc.system in HTTPS)
        self.fake_call(fake, "/_fake/reset", {})
        if sc.system == "chatbot-https-cold":
            self.fake_call(fake, "/_fake/config", {"close": True})
        port = free_port()
        shape = self.shapes[sc.shape]
        spread = reply_s(shape) if sc.pattern == "steady" else 0.0
        per_reply = max(10.0, 4 * reply_s(shape))
        deadline = spread + sc.messages * per_reply + 20
        if sc.system == "flask":
            deadline = self.args.flask_deadline_s
        if sc.mode == "idle":
            deadline = 60.0
        url = {
            "upstream": f"http://127.0.0.1:{fake.port}/v1/chat/completions",
            "http": f"http://127.0.0.1:{port}/chat",
            "ws": f"ws://127.0.0.1:{port}/ws",
            "idle": f"ws://127.0.0.1:{port}/ws",
        }[sc.mode]
        clients = max(1, min(self.args.clients, sc.n))
        # A pair system: half the sessions send on each instance and follow on the other.
        port_b = free_port() if sc.system in PAIRS else 0
        pair = (url, f"ws://127.0.0.1:{port_b}/ws") if port_b else None
        if pair:
            clients = max(2, clients + clients % 2)
        share = [sc.n // clients + (1 if i < sc.n % clients else 0) for i in range(clients)]
        procs, outs = [], []
        server: Server | Servers | None = None
        usage: dict[str, Any] = {}
        try:
            if sc.system in PAIRS:
                self.store = start_store(PAIRS[sc.system])
            for i, n in enumerate(share):
                out = self.run_dir / f"loadgen-{len(self.rows)}-{i}.json"
                target = pair[i % 2] if pair else url
                argv = [python(), "-m", "bench.loadgen", "--mode", sc.mode, "--url", target]
                if pair:
                    argv += ["--follow-url", pair[(i + 1) % 2]]
                argv += ["--n", str(n), "--offset", str(sum(share[:i]))]
                argv += ["--messages", str(sc.messages), "--spread-s", str(spread)]
                argv += ["--chunks", str(shape[1]), "--deadline-s", str(deadline)]
                argv += ["--compression", sc.compression, "--sync", "--out", str(out)]
                argv += ["--sessions-per-ip", str(self.args.sessions_per_ip)]
                procs.append(_spawn_client(argv, self.client_cpus, self.run_dir))
                outs.append(out)
            server = self.server(sc.system, fake, port, sc.server_deflate, port_b)
            if self.shares is not None and server is not None:
                self._confine(self.shares, server, sc.system)
            for proc in procs:
                _expect(proc, "loaded", 60)
                _say(proc, "warm")
            for proc in procs:
                _expect(proc, "ready", 60)
            before = server.usage() if server else None
            chatbot = sc.system.startswith("chatbot") and sc.system not in PAIRS
            gc_before = _gc_stats(port) if chatbot else None
            connections_before = self.fake_call(fake, "/_fake/stats")["connections_accepted"]
            fake_before = fake.usage()
            redis_before = self._redis_usage() if sc.system == "chatbot-redis" else None
            store_before = snapshot(self.store) if self.store else None
            throttled_before = self.shares.throttled_s() if self.shares else 0.0
            shares_before = self.shares.cpu_s() if self.shares else []
            busy_before, window_start = machine_busy_s(), time.monotonic()
            for proc in procs:
                _say(proc, "go")
            spy = self._spy(server)
            if sc.mode == "idle":
                for proc in procs:
                    _expect(proc, "held", deadline + 30)
                time.sleep(self.args.settle_s)  # let the server settle before sampling
                held = server.usage() if server else None
                usage["rss_before"] = before.rss if before else None
                usage["rss_held"] = held.rss if held else None
                for proc in procs:
                    _say(proc, "release")
            for proc in procs:
                try:
                    proc.wait(timeout=deadline + 60)
                except subprocess.TimeoutExpired:
                    raise RuntimeError("the load generator overran its deadline") from None
            busy = machine_busy_s() - busy_before
            usage["window_s"] = time.monotonic() - window_start
            if self.shares is not None:
                usage["core_share"] = self.shares.cores
                usage["throttled_s"] = self.shares.throttled_s() - throttled_before
                # how the load split over the workers (or instances)
                spent = zip(self.shares.cpu_s(), shares_before, strict=True)
                usage["process_cpu_s"] = [after - before for after, before in spent]
            after = server.usage() if server else None
            fake_after = fake.usage()
            connections = self.fake_call(fake, "/_fake/stats")["connections_accepted"]
            # Less the connection of this very call.
            usage["upstream_connections"] = connections - connections_before - 1
            if gc_before is not None:
                usage.update(_gc_window(gc_before, _gc_stats(port)))
            if spy is not None:
                spy.wait(timeout=60)
            redis_after = self._redis_usage() if redis_before is not None else None
            if self.store is not None and store_before is not None:
                usage.update(window(store_before, snapshot(self.store)))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
            if server is not None:
                server.stop()
            if self.shares is not None:
                self.shares.release()
            if self.store is not None:
                self.store.stop()
                self.store = None
        results = []
        for proc, out in zip(procs, outs, strict=True):
            if proc.returncode != 0 or not out.exists():
                log = Path(self.run_dir / f"loadgen-{proc.pid}.log").read_text()[-2000:]
                raise RuntimeError(f"the load generator failed ({proc.returncode}):\n{log}")
            results.append(json.loads(out.read_text()))
        if before is not None and after is not None:
            usage["server_cpu_s"] = after.cpu_s - before.cpu_s
            usage["peak_rss"] = after.peak_rss
            usage["server_processes"] = after.processes
        usage["fake_cpu_s"] = fake_after.cpu_s - fake_before.cpu_s
        if redis_before is not None and redis_after is not None:
            usage["redis_cpu_s"] = redis_after.cpu_s - redis_before.cpu_s
        raw = merge(results)
        mine = ("server_cpu_s", "fake_cpu_s", "redis_cpu_s", "redis_replica_cpu_s")
        ours = sum(usage.get(k, 0.0) for k in mine)
        usage["other_cpu_s"] = max(0.0, busy - ours - raw["client_cpu_s"])
        return raw, usage

    def _confine(self, shares: CpuShares, server: Server | Servers, system: str) -> None:
        """--core-share: each serving process into a CPU quota of its own; a `--workers N`
        server's workers once all N run (its supervisor only waits on them)."""
        for one in server.servers if isinstance(server, Servers) else [server]:
            pids = [one.pid]
            if system in WORKERS:
                deadline = time.monotonic() + procs.START_TIMEOUT_S
                while len(pids := descendants(one.pid)) < WORKERS[system]:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{system}: {len(pids)} of its workers started")
                    time.sleep(0.05)
            for pid in pids:
                shares.confine(pid)

    def _spy(self, server: Server | None) -> subprocess.Popen[bytes] | None:
        """py-spy attached to the server for the first seconds of the load (bench.profile)."""
        if self.profile is None or server is None:
            return None
        out, seconds, rate = self.profile
        argv = [str(Path(python()).parent / "py-spy"), "record", "--pid", str(server.pid)]
        argv += ["--duration", str(seconds), "--rate", str(rate), "--format", "raw"]
        argv += ["--output", str(out), "--nonblocking"]
        log = (self.run_dir / "py-spy.log").open("wb")
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    # -- searches ---------------------------------------------------------------------------------

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > self.args.budget_s

    def search(self, system: str, pattern: str, messages: int) -> None:
        """Measure the fixed levels, then bisect the ladder for the highest level that holds
        (assuming that a level holds when a higher one does): between the highest level known
        to hold and the lowest known to fail above it, up to the ladder's ends."""
        held: dict[int, bool] = {}
        for n in self.args.levels:
            held[n] = self.ws(system, pattern, n, messages)["holds"]
        ladder = sorted(set(self.args.ladder) | set(self.args.levels))
        while True:
            ok = [n for n, h in held.items() if h]
            lo = max(ok) if ok else 0
            failing = [n for n, h in held.items() if not h and n > lo]
            hi = min(failing) if failing else None
            between = [n for n in ladder if n > lo and (hi is None or n < hi) and n not in held]
            if not between:
                return
            # Up from a level that holds: the next rung (each costs more than the last).
            # Below a failure: the middle rung.
            n = between[0] if hi is None else between[len(between) // 2]
            if self.over_budget():
                self.notes.append(
                    f"{system} {pattern}: search stopped at the time budget before N={n:,}"
                )
                return
            held[n] = self.ws(system, pattern, n, messages)["holds"]

    def ws(self, system: str, pattern: str, n: int, messages: int) -> dict[str, Any]:
        if pattern == "burst" and self.args.bare:
            self.bare(n, "realistic", "burst")
        return self.run(Scenario(system, "ws", pattern, n, messages=messages))

    def bare_row(self, n: int, shape: str, pattern: str) -> dict[str, Any] | None:
        for r in self.rows:
            if (r["system"], r["n"], r["shape"], r["pattern"]) == ("upstream", n, shape, pattern):
                return r
        return None

    def bare(self, n: int, shape: str, pattern: str) -> None:
        if self.bare_row(n, shape, pattern) is None:
            messages = self.args.steady_messages if pattern == "steady" else 1
            self.run(Scenario("upstream", "upstream", pattern, n, shape=shape, messages=messages))


def _gc_stats(port: int) -> dict[str, float]:
    """The GC figures of a chatbot server's /metrics: collections and pause time so far, and
    the worst pauses (the highest over a few scrapes: each may reach another worker)."""
    from prometheus_client.parser import text_string_to_metric_families

    stats: dict[str, float] = {}
    for _ in range(GC_SCRAPES):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Connection": "close"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "chatbot_gc_pause_max_seconds":
                    key = f"max_{labels['clock']}_{labels['generation']}"
                elif sample.name == "chatbot_gc_pause_seconds_count":
                    key = f"count_{labels['generation']}"
                elif sample.name == "chatbot_gc_pause_seconds_sum":
                    key = f"sum_{labels['generation']}"
                else:
                    continue
                stats[key] = max(stats.get(key, 0.0), sample.value)
    return stats


def _gc_window(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What a scenario's load cost in GC: collections and pause seconds by generation, and the
    worst pauses (since the server started: the warm-up before the load is a few exchanges)."""
    gens = ("0", "1", "2")
    return {
        "gc_collections": [after.get(f"count_{g}", 0) - before.get(f"count_{g}", 0) for g in gens],
        "gc_pause_s": sum(after.get(f"sum_{g}", 0) - before.get(f"sum_{g}", 0) for g in gens),
        "gc_worst_s": max((after.get(f"max_wall_{g}", 0.0) for g in gens), default=0.0),
        "gc_worst_cpu_s": max((after.get(f"max_cpu_{g}", 0.0) for g in gens), default=0.0),
        "gc_worst_young_s": after.get("max_wall_0", 0.0),
        "gc_worst_by_generation_s": [after.get(f"max_wall_{g}", 0.0) for g in gens],
    }


def _spawn_client(
    argv: list[str], cpus: frozenset[int] | None, run_dir: Path
) -> subprocess.Popen[str]:
    from .procs import _child_setup

    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: _child_setup(cpus),
    )
    # stderr to a log named by pid, read only when the client fails
    log = (run_dir / f"loadgen-{proc.pid}.log").open("w")
    _drain_later(proc, log)
    return proc


def _drain_later(proc: subprocess.Popen[str], log: Any) -> None:
    import threading

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.write(line)
            log.flush()
        log.close()

    threading.Thread(target=pump, daemon=True).start()


def _expect(proc: subprocess.Popen[str], word: str, timeout_s: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise TimeoutError(f"the load generator did not say {word!r} in {timeout_s} s")
    line = proc.stdout.readline()
    if not line.startswith(word):
        raise RuntimeError(f"the load generator said {line!r}, expected {word!r}")
    return line


def _say(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


def _line(row: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}ms"

    cpu = row.get("server_cpu_s")
    parts = [
        f"{row['system']:>13} {row['mode']:>8}/{row['pattern']:<6} {row['shape']:<10}",
        f"N={row['n']:<5} {row['compression']:<7}",
        f"wall {row['wall_s']:.1f}s ok {row['replies_ok']}/{row['replies_expected']}",
        f"err {row['errors']} {row['error_kinds'] or ''}",
        f"ttfd+ p50 {ms(row['ttfd_overhead_p50_s'])} p99 {ms(row['ttfd_overhead_p99_s'])}",
        f"first p99 {ms(row['first_text_p99_s'])} total p99 {ms(row['total_p99_s'])}",
        f"cpu {cpu:.2f}s" if cpu is not None else "",
        f"{row['deltas_per_reply']:.1f} deltas/reply" if row.get("deltas_per_reply") else "",
        f"upstream conns {row['upstream_connections']}" if "upstream_connections" in row else "",
        f"gc worst {ms(row['gc_worst_s'])} (cpu {ms(row['gc_worst_cpu_s'])}, young "
        f"{ms(row['gc_worst_young_s'])}) collections {row['gc_collections']} worst by "
        f"generation {' '.join(ms(x) for x in row.get('gc_worst_by_generation_s', []))}"
        if "gc_worst_s" in row
        else "",
        f"rss/sock {row['rss_per_socket_kib']:.1f}KiB" if row.get("rss_per_socket_kib") else "",
        f"client {row['client_cpu_pct']:.0f}%" if row.get("client_cpu_pct") else "",
        f"other {row['other_cpu_pct']:.0f}%" if row.get("other_cpu_pct") is not None else "",
        f"deflate {row['negotiated']}" if row.get("negotiated") else "",
        f"followed {row.get('followed')}" if row.get("followed") else "",
        f"redis cpu {1e3 * row['redis_cpu_s'] / row['replies_ok']:.2f}ms/reply"
        if row.get("redis_cpu_s") and row["replies_ok"]
        else "",
        f"{row['redis_publishes'] / row['wall_s']:.0f} publishes/s"
        if row.get("redis_publishes") and row["wall_s"]
        else "",
        f"{row['replies_per_s']:.0f} replies/s" if row.get("replies_per_s") else "",
        f"share {row['core_share']:g} core/process, throttled {row['throttled_s']:.1f}s"
        if "core_share" in row
        else "",
        "HOLDS" if row["holds"] else "",
    ]
    return " | ".join(p for p in parts if p)


def plan(bench: Bench) -> None:
    """The whole benchmark, in order."""
    a = bench.args
    steady_m = a.steady_messages
    # Upstream's own latency at the fixed levels (burst levels found in searches add theirs).
    for n in a.levels:
        bench.bare(n, "realistic", "burst")
    # The baseline: Flask under gunicorn, HTTP only; then the same contract on the others.
    for n in a.flask_levels:
        bench.run(Scenario("flask", "http", "burst", n))
    for system in ("chatbot", "peer"):
        for n in a.levels:
            bench.run(Scenario(system, "http", "burst", n))
    # WebSocket: steady and burst, searching for the highest level that holds.
    for pattern, messages in (("steady", steady_m), ("burst", 1)):
        bench.search("chatbot", pattern, messages)
        bench.search("peer", pattern, messages)
        if bench.redis_ok:
            for n in a.levels:
                bench.ws("chatbot-redis", pattern, n, messages)
        else:
            bench.notes.append("no redis-server on 127.0.0.1:6379: Redis mode not measured")
        for n in a.levels:  # what the stack costs with none of chatbot's code
            bench.ws("floor", pattern, n, messages)
    # An https upstream, its pool warm and cold; every core with two workers (and Redis).
    for n in a.levels:
        for system in HTTPS:
            bench.ws(system, "steady", n, steady_m)
    if bench.redis_ok:
        for n in a.levels:
            bench.ws("chatbot-2w", "steady", n, steady_m)
    # Token rate: CPU per chunk (a server saturates at far fewer sessions in this shape).
    for n in a.token_levels:
        bench.bare(n, "token-rate", "steady")
        systems = ["chatbot", "peer", "floor"] + (["chatbot-redis"] if bench.redis_ok else [])
        for system in systems:
            bench.run(Scenario(system, "ws", "steady", n, shape="token-rate", messages=steady_m))
    # permessage-deflate: what an idle socket costs with and without it, and CPU under load.
    # The chatbot declines it unless WS_PERMESSAGE_DEFLATE=true: measure both; the peer
    # (uvicorn) accepts it when offered.
    n = min(a.levels)
    for system, deflate in (("chatbot", False), ("chatbot", True), ("peer", False)):
        for compression in ("deflate", "none"):
            if compression == "none" and deflate:
                continue  # nothing to negotiate: the same as the server's default
            sc = Scenario(system, "idle", "idle", a.idle_sockets, compression=compression)
            bench.run(dataclasses.replace(sc, server_deflate=deflate))
    bench.run(Scenario("chatbot", "ws", "steady", n, messages=steady_m, server_deflate=True))
    bench.run(Scenario("chatbot", "ws", "steady", n, messages=steady_m, compression="none"))
    bench.run(Scenario("peer", "ws", "steady", n, messages=steady_m, compression="none"))


def build_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with defaults filled in (they depend on --quick)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run (< 1 minute)")
    parser.add_argument("--levels", help="fixed concurrency levels (default 100,1000)")
    parser.add_argument("--ladder", help="levels to search for the highest that holds")
    parser.add_argument("--token-levels", help="token-rate levels (default 20,100)")
    parser.add_argument("--flask-levels", help="Flask baseline levels (default 100,1000)")
    parser.add_argument("--flask-deadline-s", type=float, help="Flask's time bound (default 30)")
    parser.add_argument("--steady-messages", type=int, help="messages per steady session (3)")
    parser.add_argument("--idle-sockets", type=int, help="idle sockets (default 5000)")
    parser.add_argument("--clients", type=int, default=1, help="load-generator processes")
    parser.add_argument("--budget-s", type=float, help="stop searching after this (default 720)")
    parser.add_argument("--no-bare", dest="bare", action="store_false",
                        help="skip the bare-upstream run for each burst level")  # fmt: skip
    parser.add_argument("--settle-s", type=float, help="idle: wait before sampling RSS (2)")
    parser.add_argument("--sessions-per-ip", type=int, default=10, help="see bench.loadgen")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness added to every process started, e.g. -10 when other "
                        "programs share the machine (root only for < 0)")  # fmt: skip
    parser.add_argument("--max-other-cpu", type=float,
                        help="rerun a scenario if other programs used more cores")  # fmt: skip
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--core-share", type=float, metavar="CORES",
                        help="give each server process (each worker, each instance) this much "
                        "of a core by a CFS quota instead of pinning (root only)")  # fmt: skip
    parser.add_argument("--out", help="markdown report (default docs/benchmarks.md, or "
                        "/tmp/bench-quick.md with --quick)")  # fmt: skip
    parser.add_argument("--json", help="also write every row as JSON here")
    parser.add_argument("--only", action="append", metavar="SYSTEM:PATTERN:N[:SHAPE]",
                        help="run just this scenario (repeatable); no report")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1,
                        help="with --only: run the list this many times, interleaved, and judge "
                        "each level by its median run")  # fmt: skip
    parser.add_argument("--render", metavar="ROWS_JSON",
                        help="only re-render the report from a run's rows.json")  # fmt: skip
    args = parser.parse_args(argv)
    quick = args.quick

    def levels(raw: str | None, default: tuple[int, ...]) -> list[int]:
        return sorted({int(x) for x in raw.split(",") if x.strip()}) if raw else list(default)

    args.levels = levels(args.levels, (50,) if quick else DEFAULT_LEVELS)
    args.ladder = levels(args.ladder, () if quick else DEFAULT_LADDER)
    args.token_levels = levels(args.token_levels, (50,) if quick else (20, 100))
    args.flask_levels = levels(args.flask_levels, (4,) if quick else DEFAULT_LEVELS)
    args.flask_deadline_s = args.flask_deadline_s or (8.0 if quick else 30.0)
    args.steady_messages = args.steady_messages or (1 if quick else 3)
    args.idle_sockets = args.idle_sockets or (200 if quick else 5000)
    args.max_other_cpu = args.max_other_cpu or (float("inf") if quick else 0.75)
    args.settle_s = args.settle_s or (0.5 if quick else 2.0)
    args.budget_s = args.budget_s or (45.0 if quick else 720.0)
    args.out = Path(args.out or ("/tmp/bench-quick.md" if quick else ROOT / "docs/benchmarks.md"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = build_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        report = Report(saved["rows"], saved["meta"])
        args.out.write_text(report.markdown(keep_analysis(args.out)))
        print(f"bench: report in {args.out}")
        return 0
    # SIGTERM as an exception, so `finally` blocks stop every server and load generator.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.only:
        return only(args)
    quick = args.quick
    out = args.out
    bench = Bench(args)
    print(f"bench: logs in {bench.run_dir}", flush=True)
    try:
        (quick_plan if quick else plan)(bench)
    finally:
        for fake in bench.fakes.values():
            fake.stop()
        if bench.shares is not None:
            bench.shares.close()
    if source_digest() != bench.digest:
        bench.notes.append(
            "chatbot/ changed while the benchmark ran (other work in progress): scenarios early "
            "and late in the run measured different versions"
        )
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    pinning = (
        f"Server on CPU {sorted(bench.server_cpus)}, fake upstream and load generator on CPU "
        f"{sorted(bench.client_cpus)}"
        if bench.server_cpus
        else "No CPU pinning"
    )
    meta = {
        "date": now(),
        "command": command.strip(),
        "machine": machine(bench.digest),
        "steady_messages": args.steady_messages,
        "notes": bench.notes,
        "setup": (
            f"All processes on this one machine, over loopback. {pinning}. One load-generator "
            "process per scenario (asyncio + uvloop; the `websockets` client's sans-I/O protocol "
            "driven from asyncio protocol callbacks, so frames are checked without a task "
            "wake-up each, with its default permessage-deflate offer unless a table says "
            "otherwise; raw HTTP/1.1 through h11 "
            "for `POST /chat` and the bare upstream). Sessions connect from "
            f"{args.sessions_per_ip} per source address across 127.0.0.2 and up (all of "
            "127.0.0.0/8 is loopback), like users behind many NATs, so the chatbot's per-IP "
            "limits (sockets and message rate per IP) apply as in production and are not "
            "reconfigured. The fake upstream (`chatbot.fake_openai`) runs for the whole run; "
            "each server starts afresh for each scenario, with default settings apart from the "
            "upstream's URL, after a few warm-up exchanges that are not measured. Steady: "
            "sessions start evenly over one reply time and each sends "
            f"{args.steady_messages} messages back to back, so about N replies are in flight. "
            "Burst: all N connect and send at once. Flask is bounded to "
            f"{args.flask_deadline_s:.0f} s per scenario: requests not answered by then count "
            f"as timeouts. Whole run: {(time.monotonic() - bench.started) / 60:.1f} min."
            + (
                f" Every process the benchmark started ran at niceness {args.nice}, ahead of "
                "anything else on the machine (what else ran is in *other CPU %*)."
                if args.nice
                else ""
            )
        ),
    }
    report = Report(bench.rows, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.markdown(keep_analysis(out)))
    json_path = Path(args.json) if args.json else bench.run_dir / "rows.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": bench.rows}, indent=1))
    print(f"bench: report in {out}, rows in {json_path}", flush=True)
    print(f"bench: finished in {time.monotonic() - bench.started:.0f} s", flush=True)
    if bench.failures:
        print(f"bench: {bench.failures} scenario(s) could not be measured", flush=True)
    return 1 if bench.failures else 0


def only(args: argparse.Namespace) -> int:
    """`--only`: the scenarios named, each printed as it ends; their rows as JSON."""
    bench = Bench(args)
    print(f"bench: logs in {bench.run_dir}", flush=True)
    try:
        for spec in args.only * args.repeat:  # interleaved: each round runs every spec once
            system, pattern, n, *rest = spec.split(":")
            shape = rest[0] if rest else "realistic"
            messages = args.steady_messages if pattern == "steady" else 1
            if n == "search":  # the highest level of --levels/--ladder that holds
                bench.search(system, pattern, messages)
            elif system == "upstream":
                bench.bare(int(n), shape, pattern)
            else:
                bench.run(Scenario(system, "ws", pattern, int(n), shape, messages=messages))
    finally:
        for fake in bench.fakes.values():
            fake.stop()
        if bench.shares is not None:
            bench.shares.close()
    json_path = Path(args.json) if args.json else bench.run_dir / "rows.json"
    meta = {"date": now(), "machine": machine(bench.digest), "notes": bench.notes}
    json_path.write_text(json.dumps({"meta": meta, "rows": bench.rows}, indent=1))
    if args.repeat > 1:
        print(levels_summary(bench.rows), flush=True)
    print(f"bench: rows in {json_path}", flush=True)
    return 1 if bench.failures else 0


def levels_summary(rows: list[dict[str, Any]]) -> str:
    """`--only … --repeat K`: each level's runs taken together. A steady level holds when its
    median run does (p99 TTFD overhead within the bound, no run with errors): one run's p99 is
    its few slowest replies, and one stall on the machine can move it past the bound. A burst
    level holds when most of its runs did."""
    runs: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault((r["system"], r["pattern"], r["shape"], r["n"]), []).append(r)
    lines = ["bench: levels over their runs (median; p99 TTFD overhead of each run)"]
    for (system, pattern, shape, n), rs in sorted(runs.items()):
        p99s = sorted(r["ttfd_overhead_p99_s"] or 0.0 for r in rs)
        median_p99 = statistics.median(p99s)
        held = sum(r["holds"] for r in rs)
        if pattern == "steady":
            ok = not any(r["errors"] for r in rs) and median_p99 <= HOLD_P99_OVERHEAD_S
        else:  # a burst is judged against the bare upstream's own run: most runs must hold
            ok = 2 * held > len(rs)
        rate = statistics.median(r["replies_per_s"] for r in rs)
        p50 = statistics.median(r["ttfd_overhead_p50_s"] or 0.0 for r in rs)
        cpu = statistics.median(r["cpu_per_reply_ms"] or 0.0 for r in rs)
        lines.append(
            f"{system:>14} {pattern}/{shape} N={n:<5} {rate:6.1f} replies/s  "
            f"p50 {p50 * 1000:.0f} ms  "
            f"p99 {median_p99 * 1000:.0f} ms ({', '.join(f'{x * 1000:.0f}' for x in p99s)})  "
            f"cpu {cpu:.2f} ms/reply  {held}/{len(rs)} held" + ("  HOLDS" if ok else "")
        )
    return "\n".join(lines)


def quick_plan(bench: Bench) -> None:
    """A smoke version of `plan`: every system and mode once, small."""
    a = bench.args
    n = a.levels[0]
    bench.bare(n, "realistic", "burst")
    bench.run(Scenario("flask", "http", "burst", a.flask_levels[0]))
    bench.ws("chatbot", "burst", n, 1)
    bench.ws("chatbot", "steady", n, a.steady_messages)
    bench.ws("peer", "burst", n, 1)
    bench.ws("floor", "steady", n, a.steady_messages)
    if bench.redis_ok:
        bench.ws("chatbot-redis", "steady", n, a.steady_messages)
    bench.run(Scenario("chatbot", "ws", "burst", n, shape="token-rate"))
    for deflate in (False, True):
        bench.run(Scenario("chatbot", "idle", "idle", a.idle_sockets, server_deflate=deflate))


if __name__ == "__main__":
    sys.exit(main())
