"""Non-streaming turns at concurrency 1, 4 and 16, each worker keeping its own conversation.

Direct: the exchange the service makes upstream (a streaming request with `include_usage` and the
same growing history, read to its end), made straight with the fake. Beside it, the bare cost of
the service's two durable writes per turn (`storage.write_durably`) at the same file size.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import storage
from bench.exchanges import Format, History, direct_turn, service_turn
from bench.harness import Bench, Sample, Scenario
from bench.processes import cpu_seconds
from bench.stats import Stats, fmt_ms

REPEATS = 5
QUESTION = "worker {w} turn {i}: how is the weather today, and what should I cook tonight?"


async def level(bench: Bench, fmt: Format, concurrency: int, turns: int) -> dict[str, float]:
    service = await bench.service()
    histories: list[History] = [[] for _ in range(concurrency)]
    conversations: list[str | None] = [None] * concurrency
    counter = [0, 0]

    async def direct() -> list[Sample]:
        counter[0] += 1
        texts = [QUESTION.format(w=w, i=counter[0]) for w in range(concurrency)]
        upstream = bench.upstream.url
        turns = (direct_turn(bench.client, upstream, fmt, histories[w], texts[w]) for w in range(concurrency))
        return list(await asyncio.gather(*turns))

    async def one_service_turn(w: int, text: str) -> float:
        started = time.perf_counter()
        conversations[w] = await service_turn(bench.client, service.url, fmt, conversations[w], text)
        return time.perf_counter() - started

    async def through() -> list[Sample]:
        counter[1] += 1
        turns = (one_service_turn(w, QUESTION.format(w=w, i=counter[1])) for w in range(concurrency))
        return list(await asyncio.gather(*turns))

    rounds = max(1, turns // (concurrency * REPEATS))
    cpu_before = cpu_seconds(service.pid)
    measured = await bench.measure({"direct": direct, "service": through}, REPEATS, rounds, warmup=3)
    cpu = cpu_seconds(service.pid) - cpu_before
    comparison = measured.compare("service")
    n = len(measured.flat("service"))
    path = service.data_dir / "conversations" / f"{conversations[0]}.json"
    size = path.stat().st_size
    note = (
        f"turns/s: direct {measured.rate('direct'):.0f}, service {measured.rate('service'):.0f}; {n} turns; "
        f"service CPU {100 * cpu / measured.wall['service']:.0f}% of a core, "
        f"{1000 * cpu / n:.1f} ms per turn; "
        f"file at the end {size // 1024} KB"
    )
    if concurrency == 1:
        note += "; added p50 by repeat (history growing): " + ", ".join(fmt_ms(a) for a in comparison.added)
    bench.compared(f"turn, c={concurrency} ({fmt})", comparison, note)
    figures = {
        "added_p50": statistics.median(comparison.added),
        "added_p99": comparison.other.p99 - comparison.baseline.p99,
        "rate": measured.rate("service"),
        "direct_rate": measured.rate("direct"),
        "mean_kb": size / 2048,
    }
    bench.results[f"turns_{fmt}_c{concurrency}"] = {**figures, "comparison": vars(comparison)}
    return figures


def durable_writes(bench: Bench, size: int) -> Stats:
    folder = bench.run_dir / "writes"
    folder.mkdir(exist_ok=True)
    data = os.urandom(size // 2).hex().encode()[:size]
    samples = []
    for _ in range(bench.count(100, 30)):
        started = time.perf_counter()
        storage.write_durably(folder / "conversation.json", data)
        samples.append(time.perf_counter() - started)
    return Stats.of(samples)


async def run(bench: Bench) -> None:
    c1 = await level(bench, "openai", 1, bench.count(100, 25))
    await level(bench, "anthropic", 1, bench.count(50, 15))
    await level(bench, "openai", 4, bench.count(120, 40))
    c16 = await level(bench, "openai", 16, bench.count(160, 80))
    matched = int(c1["mean_kb"] * 1024)
    sizes = {10 * 1024: "~10 KB", matched: f"{matched // 1024} KB (mean file size of the c=1 turn)"}
    for size, label in sizes.items():
        stats = durable_writes(bench, size)
        note = "storage.write_durably: temp file, write, fsync, rename, fsync dir"
        bench.row(f"bare durable write, {label}", {"service p50 / p99": stats.cell()}, note)
        bench.results[f"durable_write_{size}"] = vars(stats)
    two_writes = 2 * bench.results[f"durable_write_{matched}"]["p50"]
    bench.target(
        "Non-streaming turn, c=1: added p50",
        "<= its 2 durable writes + 2 ms (same file size)",
        f"added {fmt_ms(c1['added_p50'])} ms vs 2 writes {fmt_ms(two_writes)} ms ({matched // 1024} KB)",
        c1["added_p50"] <= two_writes + 2.0,
    )
    added_p99 = c1["added_p99"]
    bench.target("Non-streaming turn, c=1: added p99", "< 10 ms", f"{fmt_ms(added_p99)} ms", added_p99 < 10)
    bench.target(
        "Non-streaming turns, c=16",
        ">= 150 turns/s",
        f"{c16['rate']:.0f} turns/s (direct {c16['direct_rate']:.0f})",
        c16["rate"] >= 150,
    )


SCENARIO = Scenario("turns", "non-streaming turns at c=1/4/16, and the bare durable writes of a turn", run)
