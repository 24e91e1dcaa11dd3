"""Where a server's CPU goes under load: py-spy samples summarised by package and function.

    python -m bench.profile --system chatbot --pattern steady --n 300 [--duration-s 10]
    python -m bench.profile --summarize /tmp/x.txt        # an existing `py-spy -f raw` file

It runs one benchmark scenario (as `bench.run` does) with `py-spy record --nonblocking` attached
to the server for the first `--duration-s` seconds of the load, then prints three tables: own
time by package (the leaf frame's), own time by function, and inclusive time by function of the
`chatbot` package. Profiled runs are not used for the report's numbers.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def parse(path: Path) -> Counter[tuple[str, ...]]:
    """`py-spy record -f raw` output: one `frame;frame;...;leaf COUNT` line per stack."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _where(frame: str) -> tuple[str, str]:
    """(function label, package) of one frame. py-spy names files relative to their import
    root: `openai/_models.py`, `asyncio/runners.py`, `chatbot/chat/service.py`."""
    match = _FRAME.match(frame)
    if not match:
        return frame, "?"
    func, file = match["func"], match["file"]
    if "site-packages/" in file:
        file = file.split("site-packages/", 1)[1]
    top = file.split("/", 1)[0].removesuffix(".py")
    if top in sys.stdlib_module_names or top.startswith("<frozen"):
        package = f"stdlib {top}"
    else:
        package = top
    return f"{func} ({file})", package


def summarize(stacks: Counter[tuple[str, ...]], top: int = 25, possible: int | None = None) -> str:
    """Tables of where the samples fell. py-spy records only a thread that is running (not one
    waiting in the event loop's select), so `possible` (rate x seconds) gives how busy it was."""
    total = sum(stacks.values())
    if not total:
        return "no samples"
    own_pkg: Counter[str] = Counter()
    own_func: Counter[str] = Counter()
    incl_chatbot: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = [f for f in stack if "(" in f]  # drop the process/thread header
        if not frames:
            continue
        label, package = _where(frames[-1])
        own_pkg[package] += count
        own_func[label] += count
        seen = set()
        for frame in frames:
            label, package = _where(frame)
            if package == "chatbot" and label not in seen:
                seen.add(label)
                incl_chatbot[label] += count

    def table(title: str, counts: Counter[str]) -> list[str]:
        lines = [f"{title}", f"{'%':>6}  {'samples':>7}  where"]
        for name, count in counts.most_common(top):
            lines.append(f"{100 * count / total:6.1f}  {count:7d}  {name}")
        return [*lines, ""]

    busy = f", busy {100 * total / possible:.0f} % of the time" if possible else ""
    out = [f"{total} samples{busy}. A stack may be cut short; inclusive times are lower bounds."]
    out.append("")
    out += table("Own time by package (leaf frame):", own_pkg)
    out += table("Own time by function:", own_func)
    out += table("Inclusive time of chatbot/ functions:", incl_chatbot)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--summarize", help="summarise this py-spy raw file and exit")
    parser.add_argument("--system", default="chatbot", help="chatbot, chatbot-redis or peer")
    parser.add_argument("--pattern", default="steady", choices=("steady", "burst", "idle"))
    parser.add_argument("--shape", default="realistic", choices=("realistic", "token-rate"))
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--compression", default="deflate", choices=("deflate", "none"))
    parser.add_argument("--duration-s", type=int, default=10)
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--out", help="where to keep the raw profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(parse(Path(args.summarize)), args.top))
        return 0

    from .run import Bench, Scenario, build_args

    bench = Bench(build_args([]))
    out = Path(args.out or bench.run_dir / "profile.txt")
    bench.profile = (out, args.duration_s, args.rate)
    try:
        bench.run(
            Scenario(
                args.system,
                "idle" if args.pattern == "idle" else "ws",
                args.pattern,
                args.n,
                shape=args.shape,
                messages=args.messages,
                compression=args.compression,
            )
        )
    finally:
        for fake in bench.fakes.values():
            fake.stop()
    if not out.exists():
        print(f"no profile written; see the logs in {bench.run_dir}", file=sys.stderr)
        return 1
    print(f"raw profile: {out}\n")
    print(summarize(parse(out), args.top, args.rate * args.duration_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
