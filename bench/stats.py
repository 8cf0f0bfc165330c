"""Numbers: latency statistics, side-by-side comparisons over repeats, and the Markdown tables.

A measurement is taken in *repeats*: each repeat holds samples of every path (direct, service,
LiteLLM) taken alternately, so that whatever else the machine does hits all paths alike. The
added time and the ratio are computed per repeat (from that repeat's medians) and reported as the
median over repeats with their range: the range is the spread to read before trusting a figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from tabulate import tabulate


def percentile(values: Sequence[float], q: int) -> float:
    """The q-th percentile (1..99), interpolated between closest ranks; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def fmt_ms(value: float) -> str:
    """Three significant figures, at most two decimals; "-" for NaN."""
    if value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


@dataclass(frozen=True)
class Stats:
    """Latencies in milliseconds."""

    p50: float
    p99: float
    max: float
    n: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        ms = [s * 1000 for s in seconds]
        return cls(percentile(ms, 50), percentile(ms, 99), max(ms, default=float("nan")), len(ms))

    def cell(self) -> str:
        return f"{fmt_ms(self.p50)} / {fmt_ms(self.p99)}"


def spread(values: Sequence[float], unit: str = "", digits: int | None = None) -> str:
    """Median of per-repeat values, with their range when there is more than one: `4.6 (4.1–5.2)`."""
    if not values:
        return "-"

    def show(v: float) -> str:
        return fmt_ms(v) if digits is None else f"{v:.{digits}f}"

    middle = show(statistics.median(values)) + unit
    if len(values) == 1:
        return middle
    return f"{middle} ({show(min(values))}–{show(max(values))})"


@dataclass(frozen=True)
class Comparison:
    """One path against the baseline, from samples grouped by repeat (seconds)."""

    baseline: Stats
    other: Stats
    added: list[float]  # per repeat: p50(other) - p50(baseline), ms
    ratios: list[float]  # per repeat: p50(other) / p50(baseline)

    @classmethod
    def of(cls, baseline: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> Comparison:
        pairs = [(Stats.of(b), Stats.of(o)) for b, o in zip(baseline, other, strict=True) if b and o]
        return cls(
            Stats.of([s for repeat in baseline for s in repeat]),
            Stats.of([s for repeat in other for s in repeat]),
            [o.p50 - b.p50 for b, o in pairs],
            [o.p50 / b.p50 for b, o in pairs if b.p50 > 0],
        )

    def cells(self, label: str = "service") -> dict[str, str]:
        """The table cells of this comparison, for one row."""
        return {
            "direct p50 / p99": self.baseline.cell(),
            f"{label} p50 / p99": self.other.cell(),
            f"{label} added p50": spread(self.added),
            f"{label} ratio": spread(self.ratios, "x", 2),
        }


Row = dict[str, str]


def markdown(rows: Sequence[Row]) -> str:
    """A GitHub Markdown table whose columns are the rows' keys in order of first appearance."""
    headers: dict[str, None] = {}
    for row in rows:
        headers.update(dict.fromkeys(row))
    body = [[row.get(h, "-") for h in headers] for row in rows]
    text: str = tabulate(body, headers=list(headers), tablefmt="github", disable_numparse=True)
    return text
