"""What checkpoints cost: 50 concurrent streamed replies, the service as it is against the same
code with checkpoints off (`bench/launch.py --without checkpoints`).

A generation writes its reply's text so far to the conversation file every 2 s while it runs
(generation.py's `CHECKPOINT_SECONDS`), so a kill -9 loses at most that much text. Here 50 replies
of 500 deltas 20 ms apart (10 s each; `--quick`: 250 deltas, 5 s) start together, in turn on the
two services, in repeats (the order alternating between repeats), each service on its own data
directory. Per batch: the checkpoint writes (the `checkpoints=N` of each generation's log line at
`info`), the service's CPU (user + system, from psutil) from the first request until every reply
is saved, and per stream its duration, its time per delta (duration / deltas sent) and its
longest pause between two reads carrying deltas. Cost per checkpoint: the CPU the service as it
is spent beyond the one without, over the checkpoints it wrote, per repeat; and, as a floor free
of the streams' noise, the CPU of one checkpoint write alone (`Store.finish_reply` of the reply
still `incomplete`, as the generation calls it), timed in this process before the services start.
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import storage
from bench.conversations import make_conversation, put, text_of
from bench.harness import Bench, Scenario
from bench.processes import MODELS, Service, cpu_seconds
from bench.stats import Comparison, Stats, fmt_ms, spread

STREAMS = 50
DELAY = 0.02
INTERVAL = 2.0  # generation.CHECKPOINT_SECONDS, for the expected count
WITH, WITHOUT = "with checkpoints", "without checkpoints"
GENERATION_LINE = re.compile(rb"generation conversation=\S+ .*status=(\S+) .*checkpoints=(\d+)")


@dataclass
class Stream:
    duration: float  # s, from the request to `done`
    longest_pause: float  # s, between two reads carrying deltas


@dataclass
class Batch:
    streams: list[Stream]
    wall: float  # s, from the first request until every reply is saved
    cpu: float  # service CPU seconds over `wall`
    checkpoints: int


async def read_stream(bench: Bench, url: str, chunks: int) -> Stream:
    message = f"chunks={chunks} delay={DELAY}"
    body = {"message": message, "model": "openai/" + MODELS["openai"], "stream": True}
    started = time.perf_counter()
    last = 0.0
    longest = 0.0
    tail = b""
    done = False
    async with bench.client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"POST /api/chat answered {response.status_code}: {response.text[:300]}")
        async for data in response.aiter_bytes():
            window = tail + data
            if b"event: delta\n" in window:
                now = time.perf_counter()
                if last:
                    longest = max(longest, now - last)
                last = now
            if b"event: done\n" in window:
                done = True
            elif b"event: error\n" in window:
                raise RuntimeError(f"the service sent an error event: {window[-300:]!r}")
            tail = window[-16:]
    if not done:
        raise RuntimeError("a stream ended without `done`")
    return Stream(time.perf_counter() - started, longest)


async def saved_lines(service: Service, offset: int, count: int) -> list[tuple[bytes, int]]:
    """(status, checkpoints) of the first `count` generation log lines past `offset`: each is
    written once its reply is saved, so waiting for them waits for the saves."""
    for _ in range(600):
        with service.log_path.open("rb") as log:
            log.seek(offset)
            found = [(m[1], int(m[2])) for m in GENERATION_LINE.finditer(log.read())]
        if len(found) >= count:
            return found[:count]
        await asyncio.sleep(0.05)
    raise RuntimeError(
        f"{len(found)} of {count} generation lines in {service.log_path.name} after 30 s "
        "(the count needs the service's log at `info`: --log-level info)"
    )


async def batch(bench: Bench, service: Service, chunks: int) -> Batch:
    offset = service.log_path.stat().st_size
    url = service.url + "/api/chat"
    before = cpu_seconds(service.pid)
    started = time.perf_counter()
    streams = await asyncio.gather(*(read_stream(bench, url, chunks) for _ in range(STREAMS)))
    lines = await saved_lines(service, offset, STREAMS)
    wall = time.perf_counter() - started
    cpu = cpu_seconds(service.pid) - before
    if any(status != b"complete" for status, _ in lines):
        raise RuntimeError(f"replies not saved complete: {sorted({s.decode() for s, _ in lines})}")
    return Batch(list(streams), wall, cpu, sum(n for _, n in lines))


async def alone(bench: Bench, chars: int, samples: int) -> Stats:
    """CPU of one checkpoint write by itself (this process's, worker threads included), the text
    growing to `chars` characters as a reply's does."""
    store = storage.Store(bench.run_dir / "checkpoints-in-process")
    store.open()
    rng = random.Random(9)
    conversation = make_conversation(2, 200, rng)
    put(store.data_dir, conversation)
    reply: storage.Message = {
        **conversation["messages"][-1],
        "status": "incomplete",
        "finish_reason": None,
        "usage": None,
    }
    text = text_of(chars, rng)
    out: list[float] = []
    for i in range(samples):
        checkpoint: storage.Message = {**reply, "content": text[: chars * (i + 1) // samples]}
        started = time.process_time()
        await store.finish_reply(conversation["id"], checkpoint)
        out.append(time.process_time() - started)
    store.close()
    return Stats.of(out)


async def run(bench: Bench) -> None:
    chunks = bench.count(500, 250)
    repeats = bench.count(5, 1)
    one = await alone(bench, chunks * 4, bench.count(200, 50))
    services: dict[str, Service] = {}
    for name, without in ((WITH, ()), (WITHOUT, ("checkpoints",))):
        services[name] = await bench.launch(bench.run_dir / name.replace(" ", "-"), without=without)
        await bench.warm_up(services[name], turns=2)
        await batch(bench, services[name], 5)  # 50 connections each way, opened before measuring
    runs: dict[str, list[Batch]] = {WITH: [], WITHOUT: []}
    for repeat in range(repeats):
        for name in (WITH, WITHOUT) if repeat % 2 == 0 else (WITHOUT, WITH):
            runs[name].append(await batch(bench, services[name], chunks))
    for service in services.values():
        bench.stop(service)
    report(bench, runs, chunks, one)


def report(bench: Bench, runs: dict[str, list[Batch]], chunks: int, one: Stats) -> None:
    with_, without = runs[WITH], runs[WITHOUT]
    per_stream: dict[str, Callable[[Stream], float]] = {
        "stream duration": lambda s: s.duration,
        "time per delta": lambda s: s.duration / chunks,
        "longest pause between deltas": lambda s: s.longest_pause,
    }
    for what, value in per_stream.items():
        comparison = Comparison.of(
            [[value(s) for s in b.streams] for b in without], [[value(s) for s in b.streams] for b in with_]
        )
        note = {
            "stream duration": f"{STREAMS} streams of {chunks} deltas {DELAY * 1000:.0f} ms apart "
            f"(ideal {chunks * DELAY:.1f} s); {len(with_)} repeats",
            "time per delta": f"ideal {DELAY * 1000:.0f} ms",
            "longest pause between deltas": "per stream, between two reads carrying deltas",
        }[what]
        cells = {
            f"{WITHOUT} p50 / p99": comparison.baseline.cell(),
            f"{WITH} p50 / p99": comparison.other.cell(),
            "added p50": spread(comparison.added),
            "ratio": spread(comparison.ratios, "x", 2),
        }
        bench.row(f"{what} (ms)", cells, note)
        bench.results[f"checkpoints_{what.replace(' ', '_')}"] = vars(comparison)
    extra = [w.cpu - o.cpu for w, o in zip(with_, without, strict=True)]
    ratios = [w.cpu / o.cpu for w, o in zip(with_, without, strict=True) if o.cpu > 0]
    counts = [w.checkpoints for w in with_]
    bench.row(
        "service CPU over the streams (s)",
        {
            f"{WITHOUT} p50 / p99": spread([b.cpu for b in without], digits=2),
            f"{WITH} p50 / p99": spread([b.cpu for b in with_], digits=2),
            "added p50": spread(extra, digits=2),
            "ratio": spread(ratios, "x", 2),
        },
        "per repeat (median, range); from the first request until every reply is saved; in % of one "
        f"core: without {spread([100 * b.cpu / b.wall for b in without], digits=0)}, "
        f"with {spread([100 * b.cpu / b.wall for b in with_], digits=0)}",
    )
    expected = statistics.median(sum(int(s.duration / INTERVAL) for s in b.streams) for b in with_)
    bench.row(
        "checkpoint writes",
        {
            f"{WITHOUT} p50 / p99": spread([float(b.checkpoints) for b in without], digits=0),
            f"{WITH} p50 / p99": spread([float(c) for c in counts], digits=0),
        },
        f"per batch, from the generations' log lines; about {expected:.0f} expected (one every "
        f"{INTERVAL:.0f} s of each stream's duration)",
    )
    per_checkpoint = [1000 * e / c for e, c in zip(extra, counts, strict=True) if c]
    share = [100 * e / w.wall for e, w in zip(extra, with_, strict=True)]
    bench.row(
        "service CPU per checkpoint (ms)",
        {f"{WITH} p50 / p99": spread(per_checkpoint)},
        f"the CPU added over the checkpoints written, per repeat; in % of one core: {spread(share)}",
    )
    floor = [c * one.p50 / 1000 / o.cpu * 100 for c, o in zip(counts, without, strict=True) if o.cpu]
    core = [c * one.p50 / 1000 / w.wall * 100 for c, w in zip(counts, with_, strict=True)]
    bench.row(
        "one checkpoint write alone, CPU (ms)",
        {f"{WITH} p50 / p99": one.cell()},
        f"in-process Store.finish_reply, {one.n} writes, reply growing to {chunks * 4:,} characters; "
        f"x the writes counted: {spread(floor, '%', 1)} of the service's CPU without checkpoints, "
        f"{spread(core, '%', 1)} of one core",
    )
    bench.results["checkpoints"] = {
        name: [{"cpu": b.cpu, "wall": b.wall, "checkpoints": b.checkpoints} for b in batches]
        for name, batches in runs.items()
    }
    bench.results["checkpoint_alone"] = vars(one)
    added = statistics.median(ratios) - 1 if ratios else float("nan")
    bench.target(
        f"Checkpoints: service CPU added over {STREAMS} streams",
        "< 10%",
        f"{100 * added:+.1f}% (per repeat: {', '.join(f'{100 * (r - 1):+.1f}' for r in ratios)}); "
        f"{fmt_ms(statistics.median(per_checkpoint)) if per_checkpoint else '-'} ms a checkpoint",
        added < 0.10,
    )


SCENARIO = Scenario("checkpoints", "50 concurrent 10 s streams, with and without checkpoints", run)
