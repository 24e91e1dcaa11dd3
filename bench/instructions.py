"""CPU per reply as instructions, counted by valgrind's callgrind: a measure the machine's other
load cannot move (CPU seconds on a shared 2-core machine vary by 30 % between runs).

    python -m bench.instructions --system chatbot --n 10 --messages 3
    python -m bench.instructions --system floor --n 10 --messages 3
    python -m bench.instructions --system chatbot --cprofile /tmp/chatbot.prof   # no valgrind

One scenario as `bench.run` runs it (the fake upstream, the server, `bench.loadgen` warming up
then a steady load of N sessions with `--messages` each), with the server under
`valgrind --tool=callgrind`: its counters are zeroed right before the load and dumped right
after it, then zeroed and dumped again around an idle window as long as the load's, which is
subtracted (timers run whatever the load). The load is small because callgrind runs the server
~50x slower: enough of it and pieces that arrive together merge into one delta, so the deltas
per reply (printed, and 20 in the realistic shape) say whether the count is comparable.

With `--cprofile FILE` the server runs without valgrind, under `cProfile` for the load only
(function calls per reply are as repeatable as instructions); read it with `pstats`. With
`--opcodes FILE` it counts the bytecodes each Python function executed during the load (a
`sys.settrace` of every opcode: as slow as callgrind, as repeatable), written as JSON rows
`[file, line, function, opcodes, calls]` (a coroutine's every resumption is a call).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .procs import ROOT, Server, free_port, python

START_TIMEOUT_S = 300.0  # python with ~750 modules to import starts slowly under valgrind
PROFILE_ENV = "BENCH_CPROFILE_OUT"
OPCODES_ENV = "BENCH_OPCODES_OUT"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--system", choices=("chatbot", "floor"), default="chatbot")
    parser.add_argument("--n", type=int, default=10, help="concurrent sessions")
    parser.add_argument("--messages", type=int, default=3, help="messages per session")
    parser.add_argument("--ttft-ms", type=int, default=300)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--interval-ms", type=int, default=100)
    parser.add_argument("--cprofile", help="profile with cProfile into this file instead")
    parser.add_argument("--opcodes", help="count bytecodes per function into this file instead")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the server process itself
    args = parser.parse_args(argv)
    if args.serve:
        return _serve(args.serve)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-instr-"))
    result = measure(args, run_dir)
    print(json.dumps(result), flush=True)
    return 0


def measure(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    fake_port, port = free_port(), free_port()
    fake_argv = [python(), "-m", "chatbot.fake_openai", "--port", str(fake_port)]
    fake_argv += ["--ttft-ms", str(args.ttft_ms), "--chunks", str(args.chunks)]
    fake_argv += ["--interval-ms", str(args.interval_ms)]
    fake = Server("fake", fake_argv, port=fake_port, log_dir=run_dir, health_path="/v1/models")
    env = {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{fake_port}/v1",
        "OPENAI_API_KEY": "sk-bench",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "SHUTDOWN_GRACE_S": "2",
    }
    argv = [python(), "-m", "bench.instructions", "--serve", args.system]
    traced = args.cprofile or args.opcodes
    if args.cprofile:
        env[PROFILE_ENV] = str(Path(args.cprofile).resolve())
    elif args.opcodes:
        env[OPCODES_ENV] = str(Path(args.opcodes).resolve())
    else:
        out = run_dir / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv]
    health = "/healthz" if args.system == "chatbot" else "/"
    server = Server(args.system, argv, port=port, log_dir=run_dir, env=env, health_path=health)
    deadline = args.ttft_ms / 1000 + args.chunks * args.interval_ms / 1000
    deadline = 60 + 20 * args.messages * deadline
    loadgen = [
        python(),
        "-m",
        "bench.loadgen",
        "--mode",
        "ws",
        "--url",
        f"ws://127.0.0.1:{port}/ws",
    ]
    loadgen += ["--n", str(args.n), "--messages", str(args.messages), "--chunks", str(args.chunks)]
    loadgen += ["--spread-s", str(args.ttft_ms / 1000 + args.chunks * args.interval_ms / 1000)]
    loadgen += ["--deadline-s", str(deadline), "--sync", "--out", str(run_dir / "load.json")]
    fake.start()
    client = None
    try:
        server.start(timeout_s=START_TIMEOUT_S, answer_timeout_s=5.0)
        client = subprocess.Popen(
            loadgen, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        _expect(client, "loaded")
        _say(client, "warm")
        _expect(client, "ready")
        time.sleep(1.0)  # the warm-up's replies and sockets end
        if traced:
            os.kill(server.pid, signal.SIGUSR1)
            time.sleep(0.5)
        else:
            _control(server.pid, "-z")
        started = time.monotonic()
        _say(client, "go")
        client.wait(timeout=deadline + 120)
        window = time.monotonic() - started
        load = json.loads((run_dir / "load.json").read_text())
        result: dict[str, Any] = {
            "system": args.system,
            "n": args.n,
            "messages": args.messages,
            "replies_ok": load["replies_ok"],
            "errors": load["errors"],
            "deltas_per_reply": load["deltas"] / max(1, load["replies_ok"]),
            "window_s": round(window, 1),
        }
        if traced:
            os.kill(server.pid, signal.SIGUSR2)
            time.sleep(2.0)
            return result
        busy = _dump(server.pid, run_dir)
        _control(server.pid, "-z")
        time.sleep(window)
        idle = _dump(server.pid, run_dir)
        replies = max(1, load["replies_ok"])
        result.update(
            {
                "instructions_load": busy,
                "instructions_idle": idle,
                "instructions_per_reply": round((busy - idle) / replies),
            }
        )
        return result
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        server.stop(timeout_s=30)
        fake.stop()


def _control(pid: int, *flags: str) -> None:
    # vgdb names its pipes after $HOST and $USER as the server saw them: chatbot's HOST.
    env = {**os.environ, "HOST": "127.0.0.1"}
    subprocess.run(["callgrind_control", *flags, str(pid)], check=True, env=env, timeout=120)


def _dump(pid: int, run_dir: Path) -> int:
    """Dump the counters since the last zeroing; the instructions of that dump."""
    before = set(run_dir.glob("callgrind.out*"))
    _control(pid, "-d")
    for _ in range(600):
        new = set(run_dir.glob("callgrind.out*")) - before
        for path in new:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1])
        time.sleep(0.1)
    raise TimeoutError("callgrind wrote no dump")


def _expect(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(word):
        raise RuntimeError(f"the load generator said {line!r}, expected {word!r}")


def _say(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


def _serve(system: str) -> int:
    """The server, with cProfile switched on by SIGUSR1 and dumped by SIGUSR2 when asked."""
    out = os.environ.get(PROFILE_ENV)
    if out:
        import cProfile

        profile = cProfile.Profile()
        signal.signal(signal.SIGUSR1, lambda *_: profile.enable())

        def dump(*_: object) -> None:
            profile.disable()
            profile.dump_stats(out)

        signal.signal(signal.SIGUSR2, dump)
    elif out := os.environ.get(OPCODES_ENV):
        _count_opcodes(out)
    if system == "floor":
        from . import floor

        sys.argv = ["bench.floor", "--port", os.environ["PORT"]]
        floor.main()
        return 0
    from chatbot.cli import main as chatbot

    return chatbot(["serve"])


def _count_opcodes(out: str) -> None:
    """Count executed bytecodes per code object between SIGUSR1 and SIGUSR2."""
    counts: dict[Any, list[int]] = {}

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            counts[frame.f_code][0] += 1
        elif event == "call":
            frame.f_trace_opcodes = True
            counts.setdefault(frame.f_code, [0, 0])[1] += 1
        return trace

    def dump(*_: object) -> None:
        sys.settrace(None)
        rows = [[c.co_filename, c.co_firstlineno, c.co_name, *n] for c, n in counts.items()]
        Path(out).write_text(json.dumps(rows))

    signal.signal(signal.SIGUSR1, lambda *_: sys.settrace(trace))
    signal.signal(signal.SIGUSR2, dump)


if __name__ == "__main__":
    sys.exit(main())
