"""Streaming replies of 1, 50, 1,000 and 5,000 chunks, OpenAI and Anthropic.

Direct: a plain streaming read of the same reply from the fake. Every round streams every size,
direct then through the service, so that drift hits every size alike; the marginal cost per chunk
between two sizes is taken from totals of the same round.
"""

from __future__ import annotations

import itertools
import statistics
from functools import partial

from bench.exchanges import Format, Timing, direct_stream, service_stream
from bench.harness import Bench, Measured, Scenario
from bench.stats import fmt_ms, spread

SIZES = (1, 50, 1000, 5000)
REPEATS = 5


def slopes(measured: Measured, path: str, a: int, b: int) -> list[float]:
    """Per repeat: median over its rounds of (total(b) - total(a)) / (b - a), in µs per chunk."""
    out = []
    for low, high in zip(
        measured.samples[f"{path} {a}"]["total"], measured.samples[f"{path} {b}"]["total"], strict=True
    ):
        out.append(statistics.median((tb - ta) * 1e6 / (b - a) for ta, tb in zip(low, high, strict=True)))
    return out


async def one_format(bench: Bench, fmt: Format) -> dict[str, float]:
    service = await bench.service()

    async def direct(chunks: int) -> Timing:
        timing = await direct_stream(
            bench.client, bench.upstream.url, fmt, [{"role": "user", "content": f"chunks={chunks}"}]
        )
        if timing.deltas != chunks:
            raise RuntimeError(f"direct: {timing.deltas} deltas, expected {chunks}")
        return timing

    async def through(chunks: int) -> Timing:
        return await service_stream(bench.client, service.url, fmt, f"chunks={chunks}")

    steps = {}
    for chunks in SIZES:
        steps[f"direct {chunks}"] = partial(direct, chunks)
        steps[f"service {chunks}"] = partial(through, chunks)
    measured = await bench.measure(steps, REPEATS, bench.count(3, 1))  # type: ignore[arg-type]
    figures: dict[str, float] = {}
    for chunks in SIZES:
        first = measured.compare(f"service {chunks}", "first", f"direct {chunks}")
        total = measured.compare(f"service {chunks}", "total", f"direct {chunks}")
        bench.compared(f"{chunks:,} chunks ({fmt}): first delta", first)
        rate = chunks / (total.other.p50 / 1000)
        bench.compared(f"{chunks:,} chunks ({fmt}): total", total, f"{rate:,.0f} chunks/s relayed")
        figures[f"first_added_{chunks}"] = statistics.median(first.added)
        figures[f"ratio_{chunks}"] = statistics.median(total.ratios)
        bench.results[f"streaming_{fmt}_{chunks}"] = {"first": vars(first), "total": vars(total)}
    cells = {}
    for path in ("direct", "service"):
        for a, b in itertools.pairwise(SIZES):
            per_repeat = slopes(measured, path, a, b)
            cells[f"{path} µs/chunk {a:,}->{b:,}"] = spread(per_repeat)
            figures[f"{path}_slope_{a}_{b}"] = statistics.median(per_repeat)
    note = "median over rounds of (total(b) - total(a)) / (b - a), totals of the same round"
    bench.row(f"marginal cost per chunk ({fmt})", cells, note, table="marginal cost per chunk")
    return figures


async def run(bench: Bench) -> None:
    figures = {fmt: await one_format(bench, fmt) for fmt in ("openai", "anthropic")}
    worst = max(f[f"first_added_{n}"] for f in figures.values() for n in SIZES[1:])
    bench.target(
        "Streaming: time to first delta, added p50 (worst size)",
        "< 5 ms",
        f"worst {fmt_ms(worst)} ms",
        worst < 5,
    )
    ratios = {fmt: f["ratio_5000"] for fmt, f in figures.items()}
    bench.target(
        "Streaming 5,000 chunks: total vs direct (p50)",
        "<= 1.5x",
        "; ".join(f"{fmt} {r:.2f}x" for fmt, r in ratios.items()),
        max(ratios.values()) <= 1.5,
    )
    flat = {fmt: f["service_slope_1000_5000"] / f["service_slope_50_1000"] for fmt, f in figures.items()}
    bench.target(
        "Streaming: cost per chunk stays flat, 50 -> 5,000 chunks",
        "µs/chunk 1,000->5,000 <= 1.5x µs/chunk 50->1,000",
        "; ".join(
            f"{fmt} {fmt_ms(figures[fmt]['service_slope_50_1000'])} -> "
            f"{fmt_ms(figures[fmt]['service_slope_1000_5000'])} µs ({r:.2f}x)"
            for fmt, r in flat.items()
        ),
        all(0 < r <= 1.5 for r in flat.values()),
    )


SCENARIO = Scenario(
    "streaming", "streamed replies of 1 to 5,000 chunks: first delta, total, cost per chunk", run
)
