"""What checkpoints cost: 50 concurrent streamed replies, the service as it is against the same
code with checkpoints off (`bench/launch.py --without checkpoints`).

A generation writes its reply's text so far to the conversation file every 2 s while it runs
(generation.py's `CHECKPOINT_SECONDS`), so a kill -9 loses at most that much text. Here 50 replies
of 500 deltas 20 ms apart (10 s each; `--quick`: 250 deltas, 5 s) start 40 ms apart (spread over
one checkpoint interval, so that their checkpoints are too, as those of replies people start
would be), in turn on the two services, in repeats (the order alternating between repeats), each
service on its own data directory. Per batch, from the first request until every reply is saved:

- the checkpoint writes: the `checkpoints=N` of each generation's log line (at `info`);
- the service's CPU (user + system, psutil), split into its main thread (the event loop: HTTP,
  SSE, the SDK) and its worker threads (storage's durable writes and the search index's update
  that goes with each, the usage ledger). A checkpoint is a write in a worker thread, so the
  worker threads' difference is its cost with little of the streams' noise; the total's is noisier;
- per stream: its duration, its time per delta (duration / deltas sent) and its longest pause
  between two reads carrying deltas.

Floor: the CPU of one checkpoint write alone (`Store.finish_reply` of the reply still
`incomplete`, with the search index attached as in the service), timed in this process first.
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
from bench.processes import MODELS, Service, cpu_seconds, loop_cpu_seconds
from bench.stats import Comparison, Stats, fmt_ms, spread
from search_index import SearchIndex

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
    cpu: float  # the service's CPU seconds over `wall`
    loop: float  # of which in its main thread (the event loop)
    checkpoints: int

    @property
    def workers(self) -> float:
        return self.cpu - self.loop


async def read_stream(bench: Bench, url: str, chunks: int, after: float) -> Stream:
    await asyncio.sleep(after)
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
    found: list[tuple[bytes, int]] = []
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
    cpu, loop = cpu_seconds(service.pid), loop_cpu_seconds(service.pid)
    started = time.perf_counter()
    streams = await asyncio.gather(
        *(read_stream(bench, url, chunks, i * INTERVAL / STREAMS) for i in range(STREAMS))
    )
    lines = await saved_lines(service, offset, STREAMS)
    wall = time.perf_counter() - started
    cpu, loop = cpu_seconds(service.pid) - cpu, loop_cpu_seconds(service.pid) - loop
    if any(status != b"complete" for status, _ in lines):
        raise RuntimeError(f"replies not saved complete: {sorted({s.decode() for s, _ in lines})}")
    return Batch(list(streams), wall, cpu, loop, sum(n for _, n in lines))


async def alone(bench: Bench, chars: int, samples: int) -> Stats:
    """CPU of one checkpoint write by itself (this process's, worker threads included), the text
    growing to `chars` characters as a reply's does, the search index told of each write."""
    data_dir = bench.run_dir / "checkpoints-in-process"
    index = SearchIndex(data_dir)
    store = storage.Store(data_dir, indexer=index)
    store.open()
    index.open()
    rng = random.Random(9)
    conversation = make_conversation(2, 200, rng)
    put(store.data_dir, conversation)
    index.reconcile()
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
    index.close()
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


def pairs(runs: dict[str, list[Batch]]) -> list[tuple[Batch, Batch]]:
    """(with, without) of each repeat."""
    return list(zip(runs[WITH], runs[WITHOUT], strict=True))


def report(bench: Bench, runs: dict[str, list[Batch]], chunks: int, one: Stats) -> None:
    per_stream: dict[str, Callable[[Stream], float]] = {
        "stream duration": lambda s: s.duration,
        "time per delta": lambda s: s.duration / chunks,
        "longest pause between deltas": lambda s: s.longest_pause,
    }
    notes = {
        "stream duration": f"{STREAMS} streams of {chunks} deltas {DELAY * 1000:.0f} ms apart "
        f"(ideal {chunks * DELAY:.1f} s); repeats: {len(runs[WITH])}",
        "time per delta": f"duration / {chunks} deltas; ideal {DELAY * 1000:.0f} ms",
        "longest pause between deltas": "per stream, between two reads carrying deltas",
    }
    for what, value in per_stream.items():
        comparison = Comparison.of(
            [[value(s) for s in b.streams] for b in runs[WITHOUT]],
            [[value(s) for s in b.streams] for b in runs[WITH]],
        )
        cells = {
            f"{WITHOUT} p50 / p99": comparison.baseline.cell(),
            f"{WITH} p50 / p99": comparison.other.cell(),
            "added p50": spread(comparison.added),
            "ratio": spread(comparison.ratios, "x", 2),
        }
        bench.row(f"{what} (ms)", cells, notes[what])
        bench.results[f"checkpoints_{what.replace(' ', '_')}"] = vars(comparison)

    def cpu_row(name: str, of: Callable[[Batch], float], note: str) -> None:
        cells = {
            f"{WITHOUT} p50 / p99": spread([of(o) for _, o in pairs(runs)], digits=2),
            f"{WITH} p50 / p99": spread([of(w) for w, _ in pairs(runs)], digits=2),
            "added p50": spread([of(w) - of(o) for w, o in pairs(runs)], digits=2),
            "ratio": spread([of(w) / of(o) for w, o in pairs(runs) if of(o) > 0], "x", 2),
        }
        bench.row(name, cells, note)

    cores = {
        name: spread([100 * b.cpu / b.wall for b in batches], digits=0) for name, batches in runs.items()
    }
    cpu_row(
        "service CPU over the streams (s)",
        lambda b: b.cpu,
        "median over repeats (range); from the first request until every reply is saved; in % of "
        f"one core: without {cores[WITHOUT]}, with {cores[WITH]}",
    )
    cpu_row("  of which the event loop (s)", lambda b: b.loop, "the service's main thread")
    cpu_row(
        "  of which worker threads (s)",
        lambda b: b.workers,
        "storage's durable writes with the search index's update, the usage ledger",
    )
    counts = [w.checkpoints for w, _ in pairs(runs)]
    bench.row(
        "checkpoint writes",
        {
            f"{WITHOUT} p50 / p99": spread([float(o.checkpoints) for _, o in pairs(runs)], digits=0),
            f"{WITH} p50 / p99": spread([float(c) for c in counts], digits=0),
        },
        f"per batch, from the generations' log lines; one every {INTERVAL:.0f} s of {STREAMS} "
        f"replies of {chunks * DELAY:.0f} s: about {STREAMS * int(chunks * DELAY / INTERVAL)}",
    )
    workers = [1000 * (w.workers - o.workers) / w.checkpoints for w, o in pairs(runs) if w.checkpoints]
    total = [1000 * (w.cpu - o.cpu) / w.checkpoints for w, o in pairs(runs) if w.checkpoints]
    bench.row(
        "service CPU per checkpoint (ms)",
        {f"{WITH} p50 / p99": spread(workers)},
        f"the worker threads' CPU added over the checkpoints written; the whole service's: {spread(total)}",
    )
    share = [100 * (w.workers - o.workers) / o.cpu for w, o in pairs(runs) if o.cpu > 0]
    # 50 replies running steadily write STREAMS / INTERVAL checkpoints a second
    of_core = [ms * STREAMS / INTERVAL / 10 for ms in workers]
    bench.row(
        "checkpoints' CPU, share",
        {f"{WITH} p50 / p99": spread(share, "%", 1)},
        f"the worker threads' CPU added, in % of the service's CPU without checkpoints; "
        f"in % of one core with {STREAMS} replies running ({STREAMS / INTERVAL:.0f} checkpoints/s): "
        f"{spread(of_core, '%', 1)}",
    )
    floor = [100 * w.checkpoints * one.p50 / 1000 / o.cpu for w, o in pairs(runs) if o.cpu > 0]
    bench.row(
        "one checkpoint write alone, CPU (ms)",
        {f"{WITH} p50 / p99": one.cell()},
        f"in this process: Store.finish_reply with the search index, {one.n} writes, the reply "
        f"growing to {chunks * 4:,} characters; x the writes counted: {spread(floor, '%', 1)} "
        "of the service's CPU without checkpoints",
    )
    bench.results["checkpoints"] = {
        name: [
            {
                "cpu": b.cpu,
                "loop": b.loop,
                "wall": b.wall,
                "checkpoints": b.checkpoints,
            }
            for b in batches
        ]
        for name, batches in runs.items()
    }
    bench.results["checkpoint_alone"] = vars(one)
    added = statistics.median(share) if share else float("nan")
    bench.target(
        f"Checkpoints: CPU added to the service's over {STREAMS} streams",
        "< 10%",
        f"{added:.1f}% (per repeat: {', '.join(f'{s:.1f}' for s in share)}); "
        f"{fmt_ms(statistics.median(workers)) if workers else '-'} ms a checkpoint",
        added < 10,
    )
    # The share above depends on how fast the fake streams (a slower model costs the service less
    # per second, its checkpoints the same); this one is the capacity the checkpoints take.
    core = statistics.median(of_core) if of_core else float("nan")
    bench.target(
        f"Checkpoints of {STREAMS} running replies, in one core",
        "< 10%",
        f"{spread(of_core, '%', 1)} ({STREAMS / INTERVAL:.0f} writes/s x the CPU per checkpoint)",
        core < 10,
    )


SCENARIO = Scenario("checkpoints", "checkpoints of 50 concurrent 10 s streams: their cost", run)
