"""What Redis does per reply and keeps per session, counted by Redis itself.

    python -m bench.redis_budget [--redis single,cluster] [--sessions 200] [--messages 3]

Runs `bench.run`'s scenario `chatbot-pair-redis` (and `chatbot-pair-cluster`): two chatbot
instances against a fresh Redis (one redis-server, or a Redis Cluster of 3 masters with a replica
each, made with `redis-cli --cluster create`), the fake model, and `--sessions` sessions of
`--messages` messages, each session with one socket on each instance, so that every event is
written by one instance and published to the other, as when a user's tabs or a reconnect land on
different instances. Before the load and after it, every redis-server is asked for its own
accounting (`INFO commandstats`, `INFO stats`, `INFO memory`) and its CPU time is read from
/proc. It prints, per reply: the calls of each command (the commands the scripts run included;
`evalsha` is one script run), the bytes Redis read and wrote (replication to replicas apart),
the publishes; per shard: the CPU seconds and the share of the calls; per session: what stays in
Redis (`used_memory` after the load less before, on the masters; each replica holds as much).

The calls, bytes and publishes are counts: how busy the machine is does not change them. CPU
seconds per reply change a little with the load (a busier Redis reads more commands per wake-up).
The instances' background calls (liveness, canaries, lease renewals, the orphan sweep) during the
load are counted too: they are per second, not per reply, and small beside a reply's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis

from .procs import Usage

# bench.run's systems: two chatbot instances against one Redis, or against a cluster.
PAIRS = {"chatbot-pair-redis": "single", "chatbot-pair-cluster": "cluster"}
CLUSTER_MASTERS = 3
CLUSTER_REPLICAS = 1  # per master, as a cluster that survives a master's failure runs
PUBLISHES = ("publish", "spublish")
SCRIPTS = ("evalsha", "eval")
OWN_CALLS = ("info", "client|setinfo", "dbsize")


@dataclass(frozen=True)
class Node:
    """One redis-server: its port, its process, whether it serves slots (or is the Redis)."""

    port: int
    pid: int
    master: bool


@dataclass(frozen=True)
class NodeCounts:
    """One redis-server's own accounting at one moment."""

    port: int
    master: bool
    cpu_s: float
    calls: Counter[str]  # INFO commandstats: calls by command, the scripts' commands included
    usec: Counter[str]  # INFO commandstats: microseconds running each command (a script's
    # include those of the commands it runs)
    net_in: int  # bytes read from clients (total_net_input_bytes)
    net_out: int  # bytes written to clients (Redis 7.0's total_net_output_bytes less replication)
    repl_out: int  # bytes written to replicas
    used_memory: int
    dataset: int  # used_memory_dataset: used_memory less Redis's overhead (buffers, scripts)
    keys: int

    @classmethod
    def of(cls, node: Node) -> NodeCounts:
        with redis.Redis(port=node.port, socket_timeout=10, decode_responses=True) as client:
            stats = client.info("stats")
            memory = client.info("memory")
            commands = client.info("commandstats")
            keys = client.dbsize()
        calls = Counter({name.removeprefix("cmdstat_"): v["calls"] for name, v in commands.items()})
        usec = Counter({name.removeprefix("cmdstat_"): v["usec"] for name, v in commands.items()})
        return cls(
            port=node.port,
            master=node.master,
            cpu_s=Usage.of_pids([node.pid]).cpu_s,
            calls=calls,
            usec=usec,
            net_in=int(stats["total_net_input_bytes"]),
            net_out=int(stats["total_net_output_bytes"])
            - int(stats["total_net_repl_output_bytes"]),
            repl_out=int(stats["total_net_repl_output_bytes"]),
            used_memory=int(memory["used_memory"]),
            dataset=int(memory["used_memory_dataset"]),
            keys=int(keys),
        )

    def since(self, before: NodeCounts) -> dict[str, Any]:
        calls = self.calls.copy()
        calls.subtract(before.calls)
        usec = self.usec.copy()
        usec.subtract(before.usec)
        for own in OWN_CALLS:  # the snapshots' (chatbot sends neither)
            calls.pop(own, None)
        return {
            "port": self.port,
            "master": self.master,
            "cpu_s": self.cpu_s - before.cpu_s,
            "calls": {name: n for name, n in calls.items() if n > 0},
            "script_usec": sum(usec[name] for name in SCRIPTS),
            "net_in_bytes": self.net_in - before.net_in,
            "net_out_bytes": self.net_out - before.net_out,
            "repl_out_bytes": self.repl_out - before.repl_out,
            "memory_bytes": self.used_memory - before.used_memory,
            "dataset_bytes": self.dataset - before.dataset,
            "keys": self.keys - before.keys,
        }


class Store(Protocol):
    """A fresh Redis for one scenario: its REDIS_URL and its redis-servers."""

    url: str

    def nodes(self) -> list[Node]: ...

    def stop(self) -> None: ...


class SingleRedis:
    """One throwaway redis-server (tests/support/procs.py's, as the tests run it)."""

    def __init__(self) -> None:
        from tests.support.procs import RedisProcess

        self.process = RedisProcess().start()
        self.url = self.process.url

    def nodes(self) -> list[Node]:
        return [Node(self.process.port, self.process.pid, master=True)]

    def stop(self) -> None:
        self.process.stop()


class ClusterRedis:
    """A local Redis Cluster, 3 masters with a replica each (tests/support/procs.py's)."""

    def __init__(self) -> None:
        from tests.support.procs import RedisClusterProcess

        self.process = RedisClusterProcess(CLUSTER_MASTERS, CLUSTER_REPLICAS).start()
        self.url = self.process.url
        self._masters = {node.port for node in self.process.masters}

    def nodes(self) -> list[Node]:
        return [
            Node(node.port, node.pid, master=node.port in self._masters)
            for node in self.process.nodes
            if node.running
        ]

    def stop(self) -> None:
        self.process.stop()


def start_store(kind: str) -> Store:
    """A fresh `kind` ("single" or "cluster") Redis, started and ready for clients."""
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            raise RuntimeError(
                f"{binary} is not installed (Debian packages redis-server, redis-tools)"
            )
    return SingleRedis() if kind == "single" else ClusterRedis()


def snapshot(store: Store) -> list[NodeCounts]:
    return [NodeCounts.of(node) for node in store.nodes()]


def window(before: Iterable[NodeCounts], after: Iterable[NodeCounts]) -> dict[str, Any]:
    """What every redis-server did between two snapshots, as fields of a bench.run row."""
    earlier = {counts.port: counts for counts in before}
    nodes = [now.since(earlier[now.port]) for now in after if now.port in earlier]
    masters = [n for n in nodes if n["master"]]
    calls: Counter[str] = Counter()
    for node in masters:
        calls.update(node["calls"])
    return {
        "redis_cpu_s": sum(n["cpu_s"] for n in masters),
        "redis_replica_cpu_s": sum(n["cpu_s"] for n in nodes if not n["master"]),
        "redis_shards": masters,
        "redis_calls": dict(calls.most_common()),
        "redis_publishes": sum(calls[name] for name in PUBLISHES),
        "redis_script_usec": sum(n["script_usec"] for n in masters),
        "redis_net_in_bytes": sum(n["net_in_bytes"] for n in masters),
        "redis_net_out_bytes": sum(n["net_out_bytes"] for n in masters),
        "redis_repl_out_bytes": sum(n["repl_out_bytes"] for n in masters),
        "redis_memory_bytes": sum(n["memory_bytes"] for n in masters),
        "redis_dataset_bytes": sum(n["dataset_bytes"] for n in masters),
        "redis_keys": sum(n["keys"] for n in masters),
    }


def budget(row: dict[str, Any]) -> str:
    """A bench.run row of a pair system as the per-reply and per-session budget."""
    replies = row["replies_ok"]
    if not replies:
        return f"{row['system']}: no reply completed, nothing to divide by"
    shards = row["redis_shards"]
    events = (row.get("deltas_per_reply") or 0) + 2  # the user's message, the deltas, done
    lines = [
        f"{row['system']} ({len(shards)} master{'s' if len(shards) > 1 else ''}): "
        f"{row['n']} sessions x {row['messages']} messages, {replies} replies "
        f"({row.get('followed', 0)} followed on the other instance), "
        f"{events:.1f} logged events per reply, {row['wall_s']:.1f} s",
        f"  per reply: {sum(row['redis_calls'].values()) / replies:.1f} calls, "
        f"{row['redis_calls'].get('evalsha', 0) / replies:.1f} scripts (evalsha), "
        f"{row['redis_script_usec'] / replies:.0f} µs running scripts, "
        f"{row['redis_publishes'] / replies:.1f} publishes, "
        f"{row['redis_net_in_bytes'] / replies:,.0f} bytes in, "
        f"{row['redis_net_out_bytes'] / replies:,.0f} bytes out "
        f"(and {row['redis_repl_out_bytes'] / replies:,.0f} to replicas), "
        f"{1e3 * row['redis_cpu_s'] / replies:.3f} ms Redis CPU (masters; replicas "
        f"{1e3 * row['redis_replica_cpu_s'] / replies:.3f} ms)",
        f"  per session: {row['redis_memory_bytes'] / row['n']:,.0f} bytes of used_memory, "
        f"{row['redis_dataset_bytes'] / row['n']:,.0f} of used_memory_dataset, "
        f"{row['redis_keys'] / row['n']:.1f} keys (masters)",
        "  calls per reply by command: "
        + ", ".join(f"{name} {n / replies:.2f}" for name, n in row["redis_calls"].items()),
    ]
    total_calls = sum(row["redis_calls"].values()) or 1
    for shard in shards:
        calls = sum(shard["calls"].values())
        lines.append(
            f"  shard :{shard['port']}: {1e3 * shard['cpu_s'] / replies:.3f} ms CPU per reply, "
            f"{calls / total_calls:.0%} of the calls, {shard['memory_bytes'] / row['n']:,.0f} "
            "bytes per session"
        )
    if row["wall_s"] > 0:
        lines.append(
            f"  throughput: {replies / row['wall_s']:.1f} replies/s, "
            f"{row['redis_publishes'] / row['wall_s']:,.0f} publishes/s; one Redis core at "
            f"this CPU per reply: {replies / max(s['cpu_s'] for s in shards):,.0f} replies/s "
            "on the busiest shard"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.redis_budget",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--redis", default="single,cluster", help="single, cluster or both")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--messages", type=int, default=3, help="messages per session")
    parser.add_argument("--shape", default="realistic", help="bench.run's reply shape")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    from . import run

    kinds = [k.strip() for k in args.redis.split(",") if k.strip()]
    systems = {kind: system for system, kind in PAIRS.items()}
    out = Path(args.json or tempfile.mkstemp(prefix="redis-budget-", suffix=".json")[1])
    run_argv = ["--steady-messages", str(args.messages), "--json", str(out)]
    run_argv += [f"--only={systems[k]}:steady:{args.sessions}:{args.shape}" for k in kinds]
    status = run.main(run_argv)
    for row in json.loads(out.read_text())["rows"]:
        print(budget(row), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
