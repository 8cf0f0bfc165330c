"""The cost of a turn against the code before the product issues (7-14), side by side.

Issue 9 asks that the cost per turn stay "unchanged within noise" while branches, generations,
the index, usage and the rest were added. Both services run at once against the same fake
upstream: this checkout's, and the one at `--before-dir` (a checkout of the commit before those
issues, e.g. `git worktree add ../chat-before 721970f`). Measured in turn, in repeats: a
non-streaming turn in a growing conversation (openai, anthropic), the first delta of a 50-chunk
streamed reply, and each service's CPU per turn. Skipped (with a line saying how) without
`--before-dir`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from bench.exchanges import Format, History, Timing, direct_stream, direct_turn, service_stream, service_turn
from bench.harness import Bench, Measured, Scenario, Step
from bench.processes import Service, cpu_seconds
from bench.stats import fmt_ms, spread

REPEATS = 5
WARMUP = 3
QUESTION = "turn {i}: how is the weather today, and what should I cook tonight?"


def metered(step: Callable[[], Awaitable[float | Timing]], pid: int, cpu: list[float]) -> Step:
    """The step, with the service's CPU time over it added to `cpu[0]`."""

    async def run() -> float | Timing:
        before = cpu_seconds(pid)
        out = await step()
        cpu[0] += cpu_seconds(pid) - before
        return out

    return run


async def turns(bench: Bench, services: dict[str, Service], fmt: Format, count: int) -> None:
    history: History = []
    conversations: dict[str, str | None] = dict.fromkeys(services)
    counter = dict.fromkeys(["direct", *services], 0)

    async def direct() -> float:
        counter["direct"] += 1
        return await direct_turn(
            bench.client, bench.upstream.url, fmt, history, QUESTION.format(i=counter["direct"])
        )

    async def through(name: str) -> float:
        counter[name] += 1
        started = time.perf_counter()
        text = QUESTION.format(i=counter[name])
        conversations[name] = await service_turn(
            bench.client, services[name].url, fmt, conversations[name], text
        )
        return time.perf_counter() - started

    cpu = {name: [0.0] for name in services}
    steps: dict[str, Step] = {"direct": direct}
    steps |= {name: metered(partial(through, name), s.pid, cpu[name]) for name, s in services.items()}
    measured = await bench.measure(steps, REPEATS, max(1, count // REPEATS), warmup=WARMUP)
    report(bench, f"non-streaming turn, c=1 ({fmt})", measured, cpu, "total")


async def first_delta(bench: Bench, services: dict[str, Service], count: int) -> None:
    async def direct() -> Timing:
        return await direct_stream(
            bench.client, bench.upstream.url, "openai", [{"role": "user", "content": "chunks=50"}]
        )

    cpu = {name: [0.0] for name in services}
    steps: dict[str, Step] = {"direct": direct}
    for name, s in services.items():
        step = partial(service_stream, bench.client, s.url, "openai", "chunks=50")
        steps[name] = metered(step, s.pid, cpu[name])
    measured = await bench.measure(steps, REPEATS, max(1, count // REPEATS), warmup=WARMUP)
    report(bench, "stream of 50 chunks: first delta (openai)", measured, cpu, "first")


def report(bench: Bench, name: str, measured: Measured, cpu: dict[str, list[float]], metric: str) -> None:
    now, before = measured.compare("now", metric), measured.compare("before", metric)
    n = len(measured.flat("now"))
    cpu_turns = n + WARMUP  # the CPU was counted over the warm-up rounds too
    # per repeat: the added time now over the added time before
    ratios = [a / b for a, b in zip(now.added, before.added, strict=True) if b > 0]
    cpu_now, cpu_before = (fmt_ms(1000 * cpu[path][0] / cpu_turns) for path in ("now", "before"))
    added_now, added_before = (fmt_ms(statistics.median(c.added)) for c in (now, before))
    cells = {
        "direct p50 / p99": now.baseline.cell(),
        "before p50 / p99": before.other.cell(),
        "now p50 / p99": now.other.cell(),
        "before added p50": spread(before.added),
        "now added p50": spread(now.added),
        "now / before (added)": spread(ratios, "x", 2),
        "CPU per turn, before / now": f"{cpu_before} / {cpu_now}",
    }
    bench.row(name, cells, f"{n} turns per path")
    bench.results[f"before_{name}"] = {"now": vars(now), "before": vars(before), "cpu": cpu, "ratios": ratios}
    # "Unchanged within noise": no change lies within the spread of the repeats (the best repeat
    # adds no more than before), or every repeat is cheaper. A real regression moves the whole
    # range above 1 (the first delta before its yield was restored: 1.13-1.30x).
    bench.target(
        f"Cost per turn unchanged: {name}",
        "now / before (added p50) spans 1.0 or lies below it, over repeats",
        f"{spread(ratios, 'x', 2)}; added {added_now} vs {added_before} ms",
        bool(ratios) and min(ratios) <= 1.0,
    )


async def run(bench: Bench) -> None:
    before_dir: Path | None = bench.args.before_dir
    if before_dir is None:
        print(
            "before: skipped; pass --before-dir DIR, a checkout of the code before issues 7-14 "
            "(git worktree add ../chat-before 721970f)"
        )
        return
    services = {
        "before": await bench.launch(bench.run_dir / "before-data", service_dir=before_dir.resolve()),
        "now": await bench.launch(bench.run_dir / "now-data"),
    }
    for service in services.values():
        await bench.warm_up(service)
    await turns(bench, services, "openai", bench.count(100, 20))
    await turns(bench, services, "anthropic", bench.count(50, 15))
    await first_delta(bench, services, bench.count(100, 20))
    for service in services.values():
        bench.stop(service)


SCENARIO = Scenario(
    "before", "the cost of a turn against the code before the product issues (--before-dir)", run
)
