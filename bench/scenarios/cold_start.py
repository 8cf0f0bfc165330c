"""Cold start (launch to the first 200 on /api/health) and resident memory, on an empty data
directory and with 10,000 conversations on disk. No direct baseline: these are the service alone."""

from __future__ import annotations

import asyncio
import random
import statistics

from bench.conversations import fill
from bench.exchanges import Format, service_turn
from bench.harness import Bench, Scenario
from bench.processes import memory_mb

CONVERSATIONS = 10_000


async def run(bench: Bench) -> None:
    times, idle, after = [], [], {}
    launches = bench.count(3, 2)
    for i in range(launches):
        service = await bench.launch(bench.run_dir / f"cold-{i}")
        try:
            times.append(service.started_in * 1000)
            for _ in range(20):
                await bench.client.get(service.url + "/api/health")
            await asyncio.sleep(0.5)
            idle.append(memory_mb(service.pid))
            if i == launches - 1:  # memory once each SDK is in use (imported on first use)
                formats: tuple[Format, ...] = ("openai", "anthropic")
                for fmt in formats:
                    await service_turn(bench.client, service.url, fmt, None, "hello")
                    after[fmt] = memory_mb(service.pid)[0]
        finally:
            bench.stop(service)
    median = statistics.median(times)
    rss = statistics.median(r for r, _ in idle)
    hwm = statistics.median(h for _, h in idle)
    bench.row(
        "cold start: launch -> first 200 on /api/health (ms)",
        {"service p50 / p99": f"median {median:.0f}"},
        f"{launches} launches: " + ", ".join(f"{t:.0f}" for t in times),
    )
    bench.row(
        "RSS idle (MB): VmRSS / VmHWM",
        {"service p50 / p99": f"{rss:.0f} / {hwm:.0f}"},
        f"after the first OpenAI turn {after['openai']:.0f} MB, "
        f"then an Anthropic turn {after['anthropic']:.0f} MB",
    )
    data_dir = fill(bench.run_dir / f"listing-{CONVERSATIONS}", CONVERSATIONS, random.Random(3))
    service = await bench.launch(data_dir)
    bench.stop(service)
    bench.row(
        f"cold start with {CONVERSATIONS:,} conversations on disk (ms)",
        {"service p50 / p99": f"{service.started_in * 1000:.0f}"},
        "the listing index is built in the background; health does not wait for it",
    )
    bench.results["cold_start"] = {"ms": times, "idle_mb": idle, "after_turn_mb": after}
    bench.target("Cold start to healthy (median)", "< 1 s", f"{median:.0f} ms", median < 1000)
    bench.target("Idle RSS", "< 80 MB", f"{rss:.0f} MB (VmHWM {hwm:.0f} MB)", rss < 80)


SCENARIO = Scenario("cold_start", "cold start to healthy, and resident memory", run)
