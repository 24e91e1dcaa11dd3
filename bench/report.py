"""From raw load-generator results to report rows, target verdicts and docs/benchmarks.md."""

from __future__ import annotations

import math
import platform
import re
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

UPSTREAM_TTFT_S = 0.3  # the fake's time to first token in both shapes
HOLD_P99_OVERHEAD_S = 0.1  # steady: a level "holds" with p99 TTFD overhead <= this
BURST_EXTRA_S = 1.0  # burst: p99 connect->first text <= the bare upstream's p99 + this
UPSTREAM_POOL = 1_100  # the model client's connection limit: MAX_GENERATIONS (1,000) + 100
ANALYSIS_START = "<!-- analysis:start -->"
ANALYSIS_END = "<!-- analysis:end -->"
PACKAGES = [
    "quart",
    "hypercorn",
    "wsproto",
    "openai",
    "httpx2",
    "redis",
    "uvloop",
    "websockets",
    "h11",
    "flask",
    "gunicorn",
    "fastapi",
    "starlette",
    "uvicorn",
    "httptools",
]


def percentile(samples: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several load-generator processes' results as one."""
    if len(results) == 1:
        return results[0]
    merged = dict(results[0])
    counts = ("replies_ok", "replies_expected", "opened", "sockets", "deflated", "deltas")
    for key in (*counts, "client_cpu_s"):
        merged[key] = sum(r[key] for r in results)
    merged["followed"] = sum(r.get("followed", 0) for r in results)
    merged["n"] = sum(r["n"] for r in results)
    merged["wall_s"] = max(r["wall_s"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for kind, count in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    merged["errors"] = errors
    merged["error_examples"] = [e for r in results for e in r["error_examples"]][:8]
    merged["samples"] = {
        k: [x for r in results for x in r["samples"][k]] for k in results[0]["samples"]
    }
    return merged


def summarize(
    scenario: dict[str, Any], raw: dict[str, Any], usage: dict[str, Any]
) -> dict[str, Any]:
    """One report row: the scenario, latency percentiles, errors, costs and throughput."""
    s = raw["samples"]
    overhead = [t - UPSTREAM_TTFT_S for t in s["ttfd"]]
    errors = sum(raw["errors"].values())
    missing = raw["replies_expected"] - raw["replies_ok"] - errors
    row = dict(scenario)
    replies = raw["replies_ok"]
    wall = raw["wall_s"]
    cpu = usage.get("server_cpu_s")
    row.update(
        wall_s=wall,
        replies_ok=replies,
        replies_expected=raw["replies_expected"],
        errors=errors + max(0, missing) if scenario["mode"] != "idle" else errors,
        error_kinds=raw["errors"],
        error_examples=raw["error_examples"],
        connect_p99_s=percentile(s["connect"], 99),
        ttfd_overhead_p50_s=percentile(overhead, 50),
        ttfd_overhead_p99_s=percentile(overhead, 99),
        first_text_p50_s=percentile(s["first_text"], 50),
        first_text_p99_s=percentile(s["first_text"], 99),
        total_p50_s=percentile(s["total"], 50),
        total_p99_s=percentile(s["total"], 99),
        replies_per_s=replies / wall if wall > 0 and replies else 0.0,
        cpu_per_reply_ms=1000 * cpu / replies if cpu is not None and replies else None,
        cpu_per_chunk_us=(
            1e6 * cpu / (replies * scenario["chunks"]) if cpu is not None and replies else None
        ),
        client_cpu_pct=100 * (raw["client_cpu_s"] + usage.get("fake_cpu_s", 0.0)) / wall
        if wall > 0
        else None,
        other_cpu_pct=100 * usage["other_cpu_s"] / usage["window_s"]
        if "window_s" in usage
        else None,
        opened=raw.get("opened", 0),
        followed=raw.get("followed", 0),  # replies seen whole on a session's second socket
        # Frames per reply: fewer than the upstream's chunks when pieces were coalesced.
        deltas_per_reply=raw["deltas"] / replies if replies and scenario["mode"] == "ws" else None,
        negotiated=_negotiated(raw),
        **usage,
    )
    if scenario["mode"] == "idle" and raw.get("opened"):
        grown = usage["rss_held"] - usage["rss_before"]
        row["rss_per_socket_kib"] = grown / raw["opened"] / 1024
    row["holds"] = holds(row)  # bench.run re-judges a burst against the bare upstream
    return row


def _negotiated(raw: dict[str, Any]) -> str:
    """Whether the sockets of a run compressed: "yes", "no", "k/n" or "" (no sockets)."""
    sockets, deflated = raw.get("sockets", 0), raw.get("deflated", 0)
    if not sockets:
        return ""
    return "yes" if deflated == sockets else "no" if not deflated else f"{deflated}/{sockets}"


def holds(row: dict[str, Any], bare: dict[str, Any] | None = None) -> bool:
    """A level holds with zero errors, every reply complete and, for a burst (given the bare
    upstream's row at the same N), p99 connect→first text within the bare upstream's p99 + 1 s;
    otherwise p99 TTFD overhead within 100 ms. These are the issue's targets for steady N=1000
    and burst N=1000, applied at every level."""
    if row["errors"] or row["replies_ok"] != row["replies_expected"]:
        return False
    if row["pattern"] == "burst" and bare is not None:
        p99, bound = row.get("first_text_p99_s"), bare.get("first_text_p99_s")
        return p99 is not None and bound is not None and p99 <= bound + BURST_EXTRA_S
    p99 = row.get("ttfd_overhead_p99_s")
    return p99 is not None and p99 <= HOLD_P99_OVERHEAD_S


# -- formatting -----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "\u2013" if value is None else f"{value * 1000:.0f}"


def _s(value: float | None, digits: int = 2) -> str:
    return "\u2013" if value is None else f"{value:.{digits}f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "\u2013" if value is None else f"{value:,.{digits}f}"


def _mib(value: int | None) -> str:
    return "\u2013" if value is None else f"{value / 2**20:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "\u2013"
    return f"{a / b:,.1f}\u00d7" if a / b >= 10 else f"{a / b:.2f}\u00d7"


def _errors(row: dict[str, Any]) -> str:
    if not row["errors"]:
        return "0"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(row["error_kinds"].items()))
    missing = row["errors"] - sum(row["error_kinds"].values())
    if missing > 0:
        kinds += (", " if kinds else "") + f"incomplete {missing}"
    return f"**{row['errors']}** ({kinds})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    """Rows of one run, with the lookups that ratios and verdicts need."""

    def __init__(self, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        self.rows = rows
        self.meta = meta

    def find(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]

    def one(self, **match: Any) -> dict[str, Any] | None:
        found = self.find(**match)
        return found[-1] if found else None

    def flask_replies_per_s(self) -> float | None:
        rates = [r["replies_per_s"] for r in self.find(system="flask") if r["replies_per_s"]]
        return max(rates) if rates else None

    def bare(self, n: int, shape: str, pattern: str) -> dict[str, Any] | None:
        return self.one(system="upstream", n=n, shape=shape, pattern=pattern)

    def held(self, system: str, pattern: str, shape: str = "realistic") -> int | None:
        """The highest level that held in the search (None when none did)."""
        levels = [
            r["n"]
            for r in self.find(
                system=system,
                mode="ws",
                pattern=pattern,
                shape=shape,
                compression="deflate",
                server_deflate=False,
            )
            if r["holds"]
        ]
        return max(levels) if levels else None

    # -- tables -----------------------------------------------------------------------------------

    def upstream_table(self) -> str:
        rows = []
        for r in self.find(system="upstream"):
            rows.append(
                [
                    r["shape"],
                    r["pattern"],
                    f"{r['n']:,}",
                    _s(r["wall_s"]),
                    _ms(r["ttfd_overhead_p50_s"]),
                    _ms(r["ttfd_overhead_p99_s"]),
                    _ms(r["first_text_p99_s"]),
                    _s(r["total_p99_s"]),
                    _errors(r),
                    _num(r["replies_per_s"]),
                    _num(r["client_cpu_pct"], 0),
                    _num(r.get("other_cpu_pct"), 0),
                ]
            )
        header = [
            "shape",
            "pattern",
            "N",
            "wall s",
            "TTFT over 300 ms p50 (ms)",
            "p99 (ms)",
            "connect→first text p99 (ms)",
            "total p99 s",
            "errors",
            "replies/s",
            "client+fake CPU %",
            "other CPU %",
        ]
        return _table(header, rows)

    def http_table(self) -> str:
        flask = self.flask_replies_per_s()
        rows = []
        for r in self.find(mode="http"):
            peer = self.one(system="peer", mode="http", n=r["n"])
            rows.append(
                [
                    r["system"],
                    f"{r['n']:,}",
                    _s(r["wall_s"], 1),
                    _s(r["total_p50_s"]),
                    _s(r["total_p99_s"]),
                    _errors(r),
                    f"{r['replies_ok']:,}",
                    _s(r["server_cpu_s"]),
                    _num(r["cpu_per_reply_ms"], 2),
                    _mib(r["peak_rss"]),
                    _num(r["replies_per_s"]),
                    _ratio(r["replies_per_s"], flask),
                    _ratio(r["cpu_per_reply_ms"], peer and peer["cpu_per_reply_ms"]),
                ]
            )
        header = [
            "system",
            "N",
            "wall s",
            "total p50 s",
            "total p99 s",
            "errors",
            "replies",
            "server CPU s",
            "CPU ms/reply",
            "peak RSS MiB",
            "replies/s",
            "replies/s \u00d7 Flask",
            "CPU/reply \u00d7 peer",
        ]
        return _table(header, rows)

    def ws_table(self, pattern: str, shape: str, compression: str = "deflate") -> str:
        flask = self.flask_replies_per_s()
        rows = []
        matching = self.find(
            mode="ws", pattern=pattern, shape=shape, compression=compression, server_deflate=False
        )
        order = {"chatbot": 0, "chatbot-redis": 1, "chatbot-https": 2, "chatbot-https-cold": 3}
        order |= {"chatbot-2w": 4, "peer": 5, "floor": 6}
        for r in sorted(matching, key=lambda r: (order.get(r["system"], 9), r["n"])):
            peer = self.one(
                system="peer",
                mode="ws",
                pattern=pattern,
                shape=shape,
                n=r["n"],
                compression=compression,
                server_deflate=False,
            )
            bare = self.bare(r["n"], shape, pattern)
            cells = [
                r["system"] + (" ✔" if r["holds"] else ""),
                f"{r['n']:,}",
                _s(r["wall_s"], 1),
                _ms(r["ttfd_overhead_p50_s"]),
                _ms(r["ttfd_overhead_p99_s"]),
            ]
            if pattern == "burst":
                cells += [
                    _ms(r["first_text_p99_s"]),
                    _ms(bare["first_text_p99_s"]) if bare else "\u2013",
                ]
            cells += [
                _s(r["total_p99_s"]),
                _errors(r),
                _s(r["server_cpu_s"]),
                _num(r["cpu_per_reply_ms"], 2),
            ]
            if shape == "token-rate":
                cells.append(_num(r["cpu_per_chunk_us"], 0))
            cells += [
                _mib(r["peak_rss"]),
                _num(r["replies_per_s"]),
                _ratio(r["replies_per_s"], flask),
                _ratio(r["cpu_per_reply_ms"], peer and peer["cpu_per_reply_ms"]),
                _num(r["client_cpu_pct"], 0),
                _num(r.get("other_cpu_pct"), 0),
                _ms(r.get("gc_worst_s")),
                _num(r.get("upstream_connections"), 0),
            ]
            rows.append(cells)
        header = ["system", "N", "wall s", "TTFD overhead p50 (ms)", "p99 (ms)"]
        if pattern == "burst":
            header += ["connect→first text p99 (ms)", "bare upstream p99 (ms)"]
        header += ["total p99 s", "errors", "server CPU s", "CPU ms/reply"]
        if shape == "token-rate":
            header.append("CPU µs/chunk")
        header += [
            "peak RSS MiB",
            "replies/s",
            "replies/s \u00d7 Flask",
            "CPU/reply \u00d7 peer",
            "client+fake CPU %",
            "other CPU %",
            "worst GC pause (ms)",
            "upstream connections",
        ]
        return _table(header, rows)

    def idle_table(self) -> str:
        rows = []
        for r in self.find(mode="idle"):
            rows.append(
                [
                    r["system"],
                    r["compression"],
                    _server_deflate(r),
                    r.get("negotiated") or "\u2013",
                    f"{r['n']:,}",
                    f"{r['opened']:,}",
                    _errors(r),
                    _mib(r["rss_before"]),
                    _mib(r["rss_held"]),
                    _num(r.get("rss_per_socket_kib")),
                    _s(r["server_cpu_s"]),
                    _num(_per(r["server_cpu_s"], r["opened"], 1000), 2),
                ]
            )
        header = [
            "system",
            "client offers",
            "server allows",
            "negotiated",
            "sockets",
            "opened",
            "errors",
            "RSS before MiB",
            "RSS held MiB",
            "KiB per socket",
            "server CPU s",
            "CPU ms per socket (open + close)",
        ]
        return _table(header, rows)

    def compression_table(self) -> str:
        """Steady rows at the level where a variant without compression was run."""
        levels = {r["n"] for r in self.find(mode="ws", compression="none")}
        rows = []
        for r in sorted(
            (
                r
                for r in self.find(mode="ws", pattern="steady", shape="realistic")
                if r["n"] in levels
            ),
            key=lambda r: (r["system"], r["n"], r["compression"], r.get("server_deflate", False)),
        ):
            rows.append(
                [
                    r["system"] + (" \u2714" if r["holds"] else ""),
                    f"{r['n']:,}",
                    r["compression"],
                    _server_deflate(r),
                    r.get("negotiated") or "\u2013",
                    _errors(r),
                    _ms(r["ttfd_overhead_p50_s"]),
                    _ms(r["ttfd_overhead_p99_s"]),
                    _s(r["server_cpu_s"]),
                    _num(r["cpu_per_reply_ms"], 2),
                    _mib(r["peak_rss"]),
                    _num(r.get("other_cpu_pct"), 0),
                ]
            )
        header = [
            "system",
            "N",
            "client offers",
            "server allows",
            "negotiated",
            "errors",
            "TTFD overhead p50 (ms)",
            "p99 (ms)",
            "server CPU s",
            "CPU ms/reply",
            "peak RSS MiB",
            "other CPU %",
        ]
        return _table(header, rows)

    def held_table(self) -> str:
        rows = []
        for pattern in ("steady", "burst"):
            ours, peer = self.held("chatbot", pattern), self.held("peer", pattern)
            redis = self.held("chatbot-redis", pattern)
            tried = sorted(
                {r["n"] for r in self.find(mode="ws", pattern=pattern, shape="realistic")}
            )
            rows.append(
                [
                    pattern,
                    _level(ours),
                    _level(redis),
                    _level(peer),
                    _ratio(ours, peer) if ours and peer else "\u2013",
                    ", ".join(f"{n:,}" for n in tried),
                ]
            )
        header = [
            "pattern",
            "chatbot holds",
            "chatbot + Redis holds (100 and 1,000 only)",
            "FastAPI peer holds",
            "chatbot ÷ peer",
            "levels tried",
        ]
        return _table(header, rows)

    # -- targets ----------------------------------------------------------------------------------

    def realistic(self, system: str, pattern: str, n: int) -> dict[str, Any] | None:
        """The WebSocket row of `system` at N=`n` in the realistic shape, as shipped (the client
        offers deflate, the server keeps its default)."""
        return self.one(
            system=system,
            mode="ws",
            pattern=pattern,
            shape="realistic",
            n=n,
            compression="deflate",
            server_deflate=False,
        )

    def targets(self) -> list[tuple[str, str, bool | None]]:
        """(target, what was measured, met?) for each target of the issue."""
        out: list[tuple[str, str, bool | None]] = []
        steady = self.realistic("chatbot", "steady", 1000)
        if steady:
            ok = steady["errors"] == 0 and (steady["ttfd_overhead_p99_s"] or 1e9) <= 0.1
            out.append(
                (
                    "steady N=1000: zero errors, p99 TTFD ≤ 300 + 100 ms",
                    f"{steady['errors']} errors, p99 TTFD "
                    f"{_ms(_add(steady['ttfd_overhead_p99_s'], UPSTREAM_TTFT_S))} ms",
                    ok,
                )
            )
        floor = self.realistic("floor", "steady", 1000)
        if steady and floor:
            out.append(
                (
                    "the stack's floor at steady N=1000: `bench.floor`, a bare relay on "
                    "Hypercorn + aiohttp + uvloop with none of chatbot's code",
                    f"floor {_num(floor['cpu_per_reply_ms'], 2)} vs chatbot "
                    f"{_num(steady['cpu_per_reply_ms'], 2)} ms CPU/reply; p99 TTFD "
                    f"{_ms(_add(floor['ttfd_overhead_p99_s'], UPSTREAM_TTFT_S))} vs "
                    f"{_ms(_add(steady['ttfd_overhead_p99_s'], UPSTREAM_TTFT_S))} ms, "
                    f"{floor['errors']} errors",
                    None,
                )
            )
        burst = self.realistic("chatbot", "burst", 1000)
        bare = self.bare(1000, "realistic", "burst")
        flask = self.flask_replies_per_s()
        if burst:
            bound = _add(bare and bare["first_text_p99_s"], 1.0)
            latency_ok = bound is not None and (burst["first_text_p99_s"] or 1e9) <= bound
            ratio = burst["replies_per_s"] / flask if flask else None
            out.append(
                (
                    "burst N=1000: zero errors, p99 connect→first text ≤ bare upstream p99 + 1 s",
                    f"{burst['errors']} errors, p99 {_ms(burst['first_text_p99_s'])} ms "
                    f"vs bound {_ms(bound)} ms",
                    burst["errors"] == 0 and latency_ok,
                )
            )
            out.append(
                (
                    "burst N=1000: ≥ 100\u00d7 the Flask baseline's replies/s",
                    f"{_num(burst['replies_per_s'])} vs {_num(flask, 2)} replies/s "
                    f"= {_num(ratio, 0)}\u00d7",
                    ratio is not None and ratio >= 100,
                )
            )
        ours, peer = self.held("chatbot", "steady"), self.held("peer", "steady")
        out.append(
            (
                "≥ 2\u00d7 the sessions the FastAPI peer holds (steady, same p99 bound)",
                f"chatbot {_level(ours)} vs peer {_level(peer)}",
                bool(ours and peer and ours >= 2 * peer) if ours else False,
            )
        )
        tokens = self.find(system="chatbot", mode="ws", pattern="steady", shape="token-rate")
        token = max(tokens, key=lambda r: r["n"]) if tokens else None
        if token:
            out.append(
                (
                    f"token rate (100 chunks 20 ms apart), steady N={token['n']:,}: CPU per "
                    "reply and per chunk",
                    f"{_num(token['cpu_per_reply_ms'], 1)} ms/reply, "
                    f"{_num(token['cpu_per_chunk_us'], 0)} µs/chunk, {token['errors']} errors, "
                    f"p99 TTFD overhead {_ms(token['ttfd_overhead_p99_s'])} ms",
                    None,
                )
            )
        for deflate, label in ((False, "as shipped"), (True, "with WS_PERMESSAGE_DEFLATE=true")):
            idle = self.one(
                system="chatbot", mode="idle", compression="deflate", server_deflate=deflate
            )
            if idle and idle.get("rss_per_socket_kib") is not None:
                out.append(
                    (
                        f"idle: ≤ 40 KiB RSS per socket at {idle['n']:,} sockets, {label} "
                        "(client offers deflate)",
                        f"{_num(idle['rss_per_socket_kib'])} KiB/socket, {idle['opened']:,} "
                        f"open, deflate negotiated: {idle.get('negotiated') or '?'}",
                        idle["rss_per_socket_kib"] <= 40 and idle["opened"] == idle["n"],
                    )
                )
        mem, red = (self.realistic(s, "steady", 1000) for s in ("chatbot", "chatbot-redis"))
        if mem and red and mem["cpu_per_reply_ms"] and red["cpu_per_reply_ms"]:
            extra = red["cpu_per_reply_ms"] / mem["cpu_per_reply_ms"] - 1
            out.append(
                (
                    "Redis mode within 15% of in-process CPU per reply (steady N=1000)",
                    f"{_num(red['cpu_per_reply_ms'], 2)} vs {_num(mem['cpu_per_reply_ms'], 2)} "
                    f"ms/reply ({extra:+.0%}), "
                    f"Redis errors {red['errors']}",
                    extra <= 0.15,
                )
            )
        out += self._issue_17_targets()
        return out

    def _issue_17_targets(self) -> list[tuple[str, str, bool | None]]:
        """An https upstream with a warm pool, the worst GC pause, two workers."""
        out: list[tuple[str, str, bool | None]] = []
        https = self.find(system="chatbot-https", mode="ws", pattern="steady", shape="realistic")
        warm = min(https, key=lambda r: r["n"]) if https else None
        plain = warm and self.realistic("chatbot", "steady", warm["n"])
        if warm:
            p50 = warm["ttfd_overhead_p50_s"]
            out.append(
                (
                    f"https upstream, warm pool, steady N={warm['n']:,}: p50 TTFD overhead ≤ 5 ms",
                    f"{_ms(p50)} ms (http {_ms(plain and plain['ttfd_overhead_p50_s'])} ms); "
                    f"{_num(warm['cpu_per_reply_ms'], 2)} ms CPU/reply",
                    p50 is not None and p50 <= 0.005,
                )
            )
        biggest = max(https, key=lambda r: r["n"]) if https else None
        if biggest and "upstream_connections" in biggest:
            out.append(
                (
                    f"https upstream, steady N={biggest['n']:,}: connections opened ≤ the pool",
                    f"{biggest['upstream_connections']:,} for {biggest['replies_ok']:,} replies",
                    biggest["upstream_connections"] <= UPSTREAM_POOL,
                )
            )
        steady = self.realistic("chatbot", "steady", 1000)
        if steady and steady.get("gc_worst_s") is not None:
            out.append(
                (
                    "steady N=1000: worst GC pause ≤ 20 ms",
                    f"{_ms(steady['gc_worst_s'])} ms wall, {_ms(steady['gc_worst_cpu_s'])} ms CPU",
                    steady["gc_worst_s"] <= 0.02,
                )
            )
        one, two = (self.realistic(s, "steady", 1000) for s in ("chatbot-redis", "chatbot-2w"))
        if one and two:
            out.append(
                (
                    "2 workers + Redis, steady N=1000, against one process (the target, "
                    "≥ 1.6\u00d7 replies/s at the p99 bound, needs a search on an idle machine)",
                    f"p99 TTFD overhead {_ms(two['ttfd_overhead_p99_s'])} vs "
                    f"{_ms(one['ttfd_overhead_p99_s'])} ms, replies/s "
                    f"{_num(two['replies_per_s'])} vs {_num(one['replies_per_s'])}, errors "
                    f"{two['errors']}",
                    None,
                )
            )
        return out

    def targets_table(self) -> str:
        mark = {True: "✅ met", False: "❌ **missed**", None: "measured"}
        return _table(
            ["target", "measured", "verdict"], [[t, m, mark[ok]] for t, m, ok in self.targets()]
        )

    # -- the document -----------------------------------------------------------------------------

    def markdown(self, analysis: str) -> str:
        m = self.meta
        parts = [
            "# Benchmarks",
            "",
            "Generated by `bench/run.py` (tables and numbers) on "
            f"{m['date']}; the analysis between the markers is written by hand and kept when the "
            "file is regenerated. Reproduce with:",
            "",
            "```sh",
            ".venv/bin/pip install -e '.[test,bench]'",
            m["command"],
            "```",
            "",
            "## Machine and setup",
            "",
            _table(["", ""], [[k, v] for k, v in m["machine"].items()]),
            "",
            m["setup"],
            "",
            "## Targets",
            "",
            self.targets_table(),
            "",
            "Sessions held: the highest level tried that met the issue's bar for its pattern: "
            "zero errors, every reply complete and correct, and for steady p99 TTFD overhead "
            "≤ 100 ms, for burst p99 connect→first text ≤ the bare upstream's p99 at the same N "
            "+ 1 s. ✔ in the tables below marks each level that held. The search measures 100 "
            "and 1,000, then bisects the ladder (20 … 5,000) between the highest level that "
            "held and the lowest that failed.",
            "",
            self.held_table(),
            "",
            ANALYSIS_START,
            analysis.strip() or "## Where the time goes\n\n(to be written after a full run)",
            ANALYSIS_END,
            "",
            "## Results",
            "",
            "Columns: *TTFD overhead* is the time from sending `message` to the first `delta`, "
            "minus the upstream's own 300 ms to first token. *connect→first text* runs from the "
            "start of the TCP connect to the first `delta` (or content chunk). *server CPU* is "
            "user+system time of the server process (and its workers) during the load only; "
            "*peak RSS* its VmHWM (summed over gunicorn's processes) since start. *replies/s* is "
            "complete, correct replies divided by the wall time from the start of the load to the "
            "last reply. *\u00d7 Flask* divides by the best replies/s of the Flask baseline; "
            "*\u00d7 peer* divides by the FastAPI peer's CPU per reply at the same N. "
            "*client+fake CPU %* is the load generator's plus the fake upstream's CPU over the "
            "wall time: they share one core, so near 100 % the client side, not the server, "
            "limits the run. *other CPU %* is what the rest of the machine used meanwhile (other "
            "programs; redis-server outside Redis scenarios), from /proc/stat, over the time "
            "from the start of the load to the load generator's exit: a scenario where it passed "
            "`--max-other-cpu` (75 % of a core by default) was run again once.",
            "",
            "### Bare upstream (the load generator straight against the fake, raw HTTP streaming)",
            "",
            self.upstream_table(),
            "",
            "### HTTP `POST /chat`, burst (the Flask baseline's contract)",
            "",
            self.http_table(),
            "",
            "### WebSocket, steady (sessions start over one reply time, "
            f"{m['steady_messages']} messages each back to back)",
            "",
            self.ws_table("steady", "realistic"),
            "",
            "### WebSocket, burst (every session connects and sends at once)",
            "",
            self.ws_table("burst", "realistic"),
            "",
            "### Token rate (100 chunks 20 ms apart), steady",
            "",
            self.ws_table("steady", "token-rate"),
            "",
            "### permessage-deflate: idle sockets",
            "",
            self.idle_table(),
            "",
            "### permessage-deflate: CPU and latency under load (steady)",
            "",
            self.compression_table(),
            "",
        ]
        errors = [r for r in self.rows if r["errors"] and r["error_examples"]]
        if errors:
            parts += ["### Error examples", ""]
            for r in errors:
                label = f"{r['system']} {r['mode']} {r['pattern']} {r['shape']} N={r['n']}"
                parts.append(
                    f"- {label}: " + "; ".join(f"`{e[:160]}`" for e in r["error_examples"][:2])
                )
            parts.append("")
        if m.get("notes"):
            parts += ["### Notes from the run", "", *[f"- {n}" for n in m["notes"]], ""]
        return "\n".join(parts)


def _server_deflate(row: dict[str, Any]) -> str:
    if row["system"].startswith("chatbot"):
        return "yes (WS_PERMESSAGE_DEFLATE=true)" if row.get("server_deflate") else "no (default)"
    return "yes" if row["system"] == "peer" else "\u2013"


def _per(value: float | None, count: int, scale: float = 1.0) -> float | None:
    return None if value is None or not count else scale * value / count


def _add(a: float | None, b: float) -> float | None:
    return None if a is None else a + b


def _level(n: int | None) -> str:
    return "none" if n is None else f"{n:,}"


def machine(digest: str | None = None) -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])  # type: ignore[index]
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    import os

    return {
        "chatbot source": f"sha256 of chatbot/**/*.py = {(digest or source_digest())[:16]}",
        "CPUs (nproc)": str(os.cpu_count()),
        "CPU model": cpu,
        "RAM": f"{mem_kib / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "packages": ", ".join(versions),
    }


def source_digest() -> str:
    """Names the version of chatbot/ measured (the tree changes between commits)."""
    import hashlib

    root = Path(__file__).resolve().parents[1] / "chatbot"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def keep_analysis(path: Path) -> str:
    """The hand-written analysis of an existing report, to carry into the regenerated one."""
    if not path.exists():
        return ""
    text = path.read_text()
    if ANALYSIS_START in text and ANALYSIS_END in text:
        return text.split(ANALYSIS_START, 1)[1].split(ANALYSIS_END, 1)[0]
    return ""
