"""`/api/health` while 100 streams of 250 chunks, 20 ms apart (5 s each), run through the service.

Health is probed by `bench.probe`, a process of its own (GETs 10 ms apart), so that the load
generator's event loop is not in the figures. Each health sample is put in the phase it was sent in:
*start* (from the first request until every stream has its first delta: 100 turns being set up),
*steady* (every stream open, none finished) and *end* (from the first stream's end to the last:
100 replies being saved). Baseline: health at idle. Beside it, the same 100 paced streams read
straight from the fake, and the service's memory.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from bench.exchanges import upstream_headers, upstream_request
from bench.harness import Bench, Scenario
from bench.processes import MODELS, Service, cpu_seconds, memory_mb, start_probe
from bench.stats import Comparison, Stats, fmt_ms

STREAMS = 100
CHUNKS = 250
TEXT = f"chunks={CHUNKS} delay=0.02"


@dataclass
class Stream:
    duration: float
    first_at: float  # time.monotonic(), the probe's clock
    ended_at: float
    complete: bool


async def probe(
    bench: Bench, service: Service, count: int = 0, stop: asyncio.Event | None = None
) -> list[tuple[float, float]]:
    """(sent at, seconds) per health GET: `count` of them, or until `stop` is set."""
    proc = start_probe(bench.children, service.url + "/api/health", 0.01, count)
    if stop is not None:
        await stop.wait()
    out, _ = await asyncio.to_thread(proc.communicate, b"stop\n" if stop else None, 120)
    bench.children.stop(proc)
    samples = json.loads(out)
    if any(status != 200 for _, _, status in samples):
        raise RuntimeError("/api/health did not always answer 200")
    return [(sent, took) for sent, took, _ in samples]


async def read_stream(
    bench: Bench, url: str, body: dict[str, object], headers: dict[str, str], marker: bytes, end: bytes
) -> Stream:
    started = time.perf_counter()
    first = 0.0
    tail = b""
    complete = False
    async with bench.client.stream("POST", url, json=body, headers=headers) as response:
        async for data in response.aiter_bytes():
            window = tail + data
            if not first and marker in window:
                first = time.monotonic()
            complete = complete or end in window
            tail = window[-24:]
    return Stream(time.perf_counter() - started, first, time.monotonic(), complete)


async def direct_streams(bench: Bench) -> list[Stream]:
    url, body = upstream_request(bench.upstream.url, "openai", [{"role": "user", "content": TEXT}])
    headers = upstream_headers("openai")
    marker, end = b'"delta":{"content":', b"data: [DONE]"
    return list(
        await asyncio.gather(*(read_stream(bench, url, body, headers, marker, end) for _ in range(STREAMS)))
    )


def phases(streams: list[Stream], samples: list[tuple[float, float]], began: float) -> dict[str, list[float]]:
    last_first = max(s.first_at for s in streams)
    first_end = min(s.ended_at for s in streams)
    last_end = max(s.ended_at for s in streams)
    out: dict[str, list[float]] = {"start": [], "steady": [], "end": []}
    for sent, took in samples:
        if began <= sent < last_first:
            out["start"].append(took)
        elif last_first <= sent and sent + took <= first_end:
            out["steady"].append(took)
        elif first_end <= sent <= last_end:
            out["end"].append(took)
    return out


async def loaded(
    bench: Bench, service: Service
) -> tuple[list[Stream], dict[str, list[float]], dict[str, float]]:
    """The 100 streams through the service with the probe running; also the peak RSS and CPU shares."""
    body = {"message": TEXT, "model": "openai/" + MODELS["openai"], "stream": True}
    url = service.url + "/api/chat"
    pids = {"service": service.pid, "upstream": bench.upstream.proc.pid}
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    stop = asyncio.Event()
    probing = asyncio.create_task(probe(bench, service, stop=stop))
    await asyncio.sleep(0.2)
    began = time.monotonic()
    started = time.perf_counter()
    streams = await asyncio.gather(
        *(read_stream(bench, url, body, {}, b"event: delta\n", b"event: done\n") for _ in range(STREAMS))
    )
    wall = time.perf_counter() - started
    figures = {name: 100 * (cpu_seconds(pid) - cpu[name]) / wall for name, pid in pids.items()}
    figures["rss_mb"], figures["hwm_mb"] = memory_mb(service.pid)
    stop.set()
    samples = await probing
    if not all(s.complete for s in streams):
        raise RuntimeError(
            f"{sum(not s.complete for s in streams)} of {STREAMS} streams did not end with `done`"
        )
    return list(streams), phases(list(streams), samples, began), figures


async def run(bench: Bench) -> None:
    service = await bench.service()
    await probe(bench, service, count=20)  # warm-up
    idle = [took for _, took in await probe(bench, service, count=bench.count(200, 50))]
    rss_before, _ = memory_mb(service.pid)
    repeats = bench.count(2, 1)
    direct_runs: list[list[float]] = []
    service_runs: list[list[float]] = []
    phase_runs: list[dict[str, list[float]]] = []
    figures: dict[str, float] = {}
    for _ in range(repeats):
        direct_runs.append([s.duration for s in await direct_streams(bench)])
        streams, by_phase, figures = await loaded(bench, service)
        service_runs.append([s.duration for s in streams])
        phase_runs.append(by_phase)
    for phase in ("start", "steady", "end"):
        comparison = Comparison.of([idle] * repeats, [run[phase] for run in phase_runs])
        note = f"{comparison.other.n} samples; max {fmt_ms(comparison.other.max)} ms"
        bench.compared(f"/api/health, idle -> {STREAMS} streams, {phase} phase", comparison, note)
        bench.results[f"health_{phase}"] = vars(comparison)
    under = Stats.of([t for run in phase_runs for phase in run.values() for t in phase])
    bench.compared(
        f"{STREAMS} paced streams of {CHUNKS} chunks: stream duration",
        Comparison.of(direct_runs, service_runs),
        f"ideal {CHUNKS * 0.02:.1f} s; CPU in % of one core: service {figures['service']:.0f}, "
        f"upstream {figures['upstream']:.0f}",
    )
    bench.row(
        f"service RSS (MB): before -> after {STREAMS} streams",
        {"direct p50 / p99": f"{rss_before:.0f}", "service p50 / p99": f"{figures['rss_mb']:.0f}"},
        f"VmHWM (lifetime peak) {figures['hwm_mb']:.0f} MB",
    )
    bench.results["health_all_phases"] = vars(under)
    bench.target(
        f"/api/health p99 with {STREAMS} streams running",
        "< 20 ms",
        f"{fmt_ms(under.p99)} ms (idle {fmt_ms(Stats.of(idle).p99)} ms); by phase: "
        + ", ".join(
            f"{p} {fmt_ms(bench.results[f'health_{p}']['other'].p99)}" for p in ("start", "steady", "end")
        ),
        under.p99 < 20,
    )


SCENARIO = Scenario("health", "/api/health under 100 streams, by phase (start, steady, end)", run)
