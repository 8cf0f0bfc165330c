"""The first page of the listing (`GET /api/conversations?limit=50`) with 100, 1,000 and 10,000
conversations on disk, each on a freshly started service.

The service builds its listing index in the background from start-up; until it is complete the
listing shows what is indexed so far. "Cold": from the service's readiness until the index is
complete (search stops answering 503); "warm": listings after that. Direct: building the same
index in-process (`search_index.SearchIndex`: open and reconcile every file into a new SQLite index).
"""

from __future__ import annotations

import asyncio
import random
import time

import orjson

import search_index
from bench.conversations import fill
from bench.harness import Bench, Scenario
from bench.processes import memory_mb
from bench.stats import Stats, fmt_ms, spread

COUNTS = (100, 1000, 10000)
REPEATS = 5


async def run(bench: Bench) -> None:
    rng = random.Random(3)
    for count in COUNTS:
        data_dir = fill(bench.run_dir / f"listing-{count}", count, rng)
        service = await bench.launch(data_dir, ready_path="/docs")  # /docs: not health, which reads the index
        url = f"{service.url}/api/conversations?limit=50"
        try:
            # While the index is first built the listing answers at once with what is indexed so
            # far and search answers 503 (SPEC.md §3): "cold" is the time from the service's
            # readiness until search answers, i.e. the index is complete.
            started = time.perf_counter()
            while (await bench.client.get(f"{service.url}/api/search?q=quick")).status_code == 503:
                if time.perf_counter() - started > 900:
                    raise RuntimeError("the index was still being built after 900 s")
                await asyncio.sleep(0.005)
            cold = time.perf_counter() - started
            response = await bench.client.get(url)
            if response.status_code != 200 or len(orjson.loads(response.content)["items"]) != min(50, count):
                raise RuntimeError(f"GET {url} answered {response.status_code}: {response.text[:200]}")
            warm: list[list[float]] = []
            for _ in range(REPEATS):
                warm.append([])
                for _ in range(bench.count(20, 4)):
                    started = time.perf_counter()
                    await bench.client.get(url)
                    warm[-1].append(time.perf_counter() - started)
            rss, _ = memory_mb(service.pid)
        finally:
            bench.stop(service)
        (data_dir / "index.sqlite3").unlink(missing_ok=True)
        index = search_index.SearchIndex(data_dir)
        started = time.perf_counter()
        index.open()
        index.reconcile()
        build = time.perf_counter() - started
        stats = Stats.of([s for repeat in warm for s in repeat])
        cells = {
            "direct p50 / p99": f"index build {build * 1000:.0f}",
            "service p50 / p99": f"cold {cold * 1000:.0f}; warm {stats.cell()}",
            "service added p50": "warm p50 by repeat " + spread([Stats.of(r).p50 for r in warm]),
        }
        bench.row(f"listing, first page of {count:,} conversations", cells, f"service RSS {rss:.0f} MB")
        bench.results[f"listing_{count}"] = {
            "cold_ms": cold * 1000,
            "warm": vars(stats),
            "build_ms": build * 1000,
        }
        if count == COUNTS[-1]:
            bench.target(
                f"First page of the listing, {count:,} conversations (warm p50)",
                "< 10 ms",
                f"warm p50 {fmt_ms(stats.p50)} ms (p99 {fmt_ms(stats.p99)}; cold {cold * 1000:.0f} ms)",
                stats.p50 < 10,
            )


SCENARIO = Scenario("listing", "first page of the listing with 100/1,000/10,000 conversations", run)
