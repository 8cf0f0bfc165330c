"""What a scenario gets: `Bench`, the run's processes, load generator and report.

A scenario is one file in `bench/scenarios/` that defines

    async def run(bench: Bench) -> None: ...
    SCENARIO = Scenario("name", "what it measures, in one line", run)

and is listed in `bench/scenarios/__init__.py`. In `run` it takes the shared service
(`await bench.service()`) or launches its own (`bench.launch(...)`), measures paths side by side
with `bench.measure({"direct": ..., "service": ...}, ...)`, and reports with `bench.row(...)` (one
table per scenario), `bench.target(...)` and `bench.results[...]` (the JSON). Sample counts come
from `bench.count(full, quick)`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from bench import litellm
from bench.exchanges import Format, Timing, service_turn
from bench.processes import Children, Service, Upstream, free_port, service_env, spawn_service, wait_ready
from bench.stats import Comparison, Row


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    run: Callable[[Bench], Awaitable[None]]
    default: bool = True  # run by `python -m bench.run` without names


# What one step of a path returns: one Timing (or seconds), or a list of them (concurrent workers).
Sample = Timing | float
Step = Callable[[], Awaitable[Sample | list[Sample]]]


@dataclass
class Measured:
    """Samples per path and metric ("first", "total"), grouped by repeat, in seconds."""

    samples: dict[str, dict[str, list[list[float]]]]
    wall: dict[str, float]  # seconds spent in each path's steps

    def compare(self, path: str, metric: str = "total", baseline: str = "direct") -> Comparison:
        return Comparison.of(self.samples[baseline][metric], self.samples[path][metric])

    def flat(self, path: str, metric: str = "total") -> list[float]:
        return [s for repeat in self.samples[path][metric] for s in repeat]

    def rate(self, path: str) -> float:
        """Exchanges per second of wall time in this path."""
        return len(self.flat(path)) / self.wall[path] if self.wall[path] else float("nan")


@dataclass
class Bench:
    args: argparse.Namespace
    run_dir: Path
    children: Children
    upstream: Upstream
    client: httpx2.AsyncClient = field(
        default_factory=lambda: httpx2.AsyncClient(
            timeout=httpx2.Timeout(60.0),
            limits=httpx2.Limits(max_connections=300, max_keepalive_connections=300),
            trust_env=False,
        )
    )
    tables: dict[str, list[Row]] = field(default_factory=dict)
    targets: list[Row] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    current: str = ""  # the scenario running: its rows go to its table
    _service: Service | None = None
    _litellm: str | None = None

    # --- sizes --------------------------------------------------------------------------------

    def count(self, full: int, quick: int) -> int:
        return quick if self.args.quick else full

    # --- processes ----------------------------------------------------------------------------

    async def launch(
        self,
        data_dir: Path,
        ready_path: str = "/api/health",
        without: Iterable[str] = (),
        gc_log: Path | None = None,
        service_dir: Path | None = None,
    ) -> Service:
        """Start the service on `data_dir` and wait for its first 200 on `ready_path`. `without`:
        optimisations to switch off (see bench/launch.py); `service_dir`: another checkout's."""
        port = free_port()
        extra = [arg for name in without for arg in ("--without", name)]
        extra += ["--gc-log", str(gc_log)] if gc_log else []
        env = service_env(self.upstream, data_dir, port, self.args.log_level)
        log_path = self.run_dir / f"service-{port}.log"
        where = service_dir or self.args.service_dir
        service = spawn_service(self.children, where, env, data_dir, log_path, extra)
        service.started_in = await wait_ready(
            service.proc, service.url + ready_path, log_path, service.launched
        )
        return service

    def stop(self, service: Service) -> None:
        self.children.stop(service.proc)

    async def service(self) -> Service:
        """The service most scenarios share: started once, warmed up with a few turns of each format
        (which imports the SDKs and opens the upstream connections)."""
        if self._service is None or self._service.proc.poll() is not None:
            self._service = await self.launch(self.run_dir / "main-data")
            await self.warm_up(self._service)
        return self._service

    async def warm_up(self, service: Service, turns: int = 5) -> None:
        formats: tuple[Format, ...] = ("openai", "anthropic")
        for fmt in formats:
            conversation: str | None = None
            for i in range(turns):
                conversation = await service_turn(self.client, service.url, fmt, conversation, f"warm-up {i}")

    async def litellm(self) -> str:
        """The base URL (…/v1) of a LiteLLM proxy in front of the same fake upstream (--vs-litellm)."""
        if self._litellm is None:
            _, self._litellm = await litellm.start(self.children, self.upstream, self.run_dir)
            self.results["litellm_version"] = litellm.version()
        return self._litellm

    # --- measuring ----------------------------------------------------------------------------

    async def measure(
        self, steps: dict[str, Step], repeats: int, per_repeat: int, warmup: int = 2
    ) -> Measured:
        """Each repeat runs `per_repeat` rounds of one step of every path in turn, so that drift
        and other work on the machine hit every path alike. The first `warmup` rounds are dropped."""
        samples: dict[str, dict[str, list[list[float]]]] = {path: {} for path in steps}
        wall = dict.fromkeys(steps, 0.0)
        for _ in range(warmup):
            for step in steps.values():
                await step()
        for repeat in range(repeats):
            for _ in range(per_repeat):
                for path, step in steps.items():
                    started = time.perf_counter()
                    out = await step()
                    wall[path] += time.perf_counter() - started
                    for sample in out if isinstance(out, list) else [out]:
                        metrics = {"total": sample} if isinstance(sample, float) else vars(sample)
                        for metric in ("first", "total"):
                            if metric in metrics:
                                series = samples[path].setdefault(metric, [[] for _ in range(repeats)])
                                series[repeat].append(metrics[metric])
        return Measured(samples, wall)

    # --- reporting ----------------------------------------------------------------------------

    def row(self, name: str, cells: Row | None = None, note: str = "", table: str = "") -> None:
        """A row of the running scenario's table (or of another table of its own, named `table`)."""
        title = f"{self.current} ({table})" if table else self.current
        self.tables.setdefault(title, []).append({"measurement": name, **(cells or {}), "notes": note})

    def compared(self, name: str, comparison: Comparison, note: str = "", label: str = "service") -> None:
        self.row(name, comparison.cells(label), note)

    def target(self, name: str, goal: str, measured: str, ok: bool) -> None:
        self.targets.append(
            {"target": name, "goal": goal, "measured": measured, "result": "PASS" if ok else "FAIL"}
        )

    async def close(self) -> None:
        await self.client.aclose()
