"""Benchmark of the chat service against a zero-latency fake upstream, in one command.

    .venv/bin/python -m bench.run                    # every scenario (a few minutes on 2 cores)
    .venv/bin/python -m bench.run streaming health   # only these (`--list` names them all)
    .venv/bin/python -m bench.run --quick            # fewer samples: a smoke run
    .venv/bin/python -m bench.run --vs-litellm       # also the three-way with LiteLLM's proxy

The fake upstream (`bench.upstream`) and the service run as their own processes on loopback; this
process generates the load (httpx2 on one uvloop event loop). Every figure with a baseline is
measured side by side with it in the same run (see bench/stats.py and bench/harness.py), and the
scenarios are one file each in bench/scenarios/ (see its `__init__` for how to add one). Prints
the tables in Markdown and writes them, with every figure, to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import uvloop

from bench import litellm
from bench.harness import Bench, Scenario
from bench.processes import ROOT, Children, start_upstream
from bench.scenarios import ALL
from bench.stats import markdown

RESULTS = ROOT / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="run only these scenarios")
    parser.add_argument("--list", action="store_true", help="name the scenarios and stop")
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--vs-litellm", action="store_true", help="also run the `litellm` scenario")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--service-dir", type=Path, default=ROOT, help="the checkout whose main.py runs")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (data and logs)")
    parser.add_argument(
        "--before-dir", type=Path, help="a checkout of the code before issues 7-14, for the `before` scenario"
    )
    return parser.parse_args(argv)


def chosen(args: argparse.Namespace) -> list[Scenario]:
    by_name = {s.name: s for s in ALL}
    if unknown := [n for n in args.names if n not in by_name]:
        raise SystemExit(f"no scenario {', '.join(unknown)}; there are: {', '.join(by_name)}")
    if args.names:
        return [by_name[n] for n in args.names]
    return [s for s in ALL if s.default or (s.name == "litellm" and args.vs_litellm)]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True
    )
    return {
        "cores": str(psutil.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else ""),
        "load_before": load(),
    }


async def run_all(bench: Bench, scenarios: list[Scenario]) -> None:
    try:
        for scenario in scenarios:
            print(f"{scenario.name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            bench.current = f"{scenario.name}: {scenario.about}"
            try:
                await scenario.run(bench)
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                bench.errors.append(f"{scenario.name}: {message}")
                bench.row("ERROR", {}, message)
                print(f"  ! {message}", file=sys.stderr, flush=True)
            print(f"{scenario.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        await bench.close()


def report(bench: Bench, info: dict[str, str], elapsed: float) -> str:
    lines = [
        "## Machine",
        "",
        f"- {info['cores']} cores, {info['memory']}; Python {info['python']} on {info['platform']}",
        f"- {info['date']}, commit {info['commit']}, run in {elapsed:.0f} s; load average before "
        f"{info['load_before']}, after {info['load_after']}",
    ]
    if "litellm_version" in bench.results:
        lines.append(f"- LiteLLM {bench.results['litellm_version']}")
    lines += ["", "## Results (ms unless stated; ranges are over repeats)"]
    for title, rows in bench.tables.items():
        lines += ["", f"### {title}", "", markdown(rows)]
    if bench.targets:
        lines += ["", "## Targets", "", markdown(bench.targets)]
    if bench.errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in bench.errors]
    return "\n".join(lines)


def as_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run as Ctrl-C does: every child is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = chosen(args)
    if args.list:
        print("\n".join(f"{s.name:14} {s.about}" for s in ALL))
        return 0
    if any(s.name == "litellm" for s in scenarios):
        litellm.ensure_installed()
    info = machine()
    run_dir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    children = Children()
    signal.signal(signal.SIGTERM, interrupt)
    started = time.perf_counter()
    try:
        bench = Bench(args, run_dir, children, start_upstream(children, run_dir / "upstream.log"))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run_all(bench, scenarios))
    except KeyboardInterrupt:
        print("interrupted: stopping the processes", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    info["load_after"] = load()
    text = report(bench, info, time.perf_counter() - started)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"bench-{stamp}.md").write_text(text + "\n")
    payload = {"machine": info, "tables": bench.tables, "targets": bench.targets, "results": bench.results}
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(payload, indent=1, default=as_json))
    print(f"\nwritten to bench/results/bench-{stamp}.md and .json", file=sys.stderr)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
