"""What each optimisation the first benchmark drove is worth now: the service as it is against the
same code with one of them switched off (`bench/launch.py --without NAME`), all running at once
and measured in turn, so that the machine's noise hits them alike.

- `cache` (storage's `RecentConversations`): a non-streaming turn in a 200-message conversation.
- `first-yield` (the `sleep(0)` after a generation's first delta, generation.py): time to the
  first delta of a 5,000-chunk reply.
- `gc-freeze` (main.py, after start-up): the pauses of the garbage collector over the whole
  workload (both of the above), from `gc.callbacks` in each service process.
"""

from __future__ import annotations

import json
import random
import time

from bench.conversations import make_conversation, put
from bench.exchanges import Timing, service_stream, service_turn
from bench.harness import Bench, Scenario, Step
from bench.processes import Service
from bench.stats import Comparison, fmt_ms

SWITCHES = ("cache", "first-yield", "gc-freeze")
BASE = "as is"
REPEATS = 5


async def start_all(bench: Bench) -> tuple[dict[str, Service], str]:
    """The service as is and once without each switch, each on a copy of one 200-message conversation."""
    conversation = make_conversation(200, 600, random.Random(4))
    services: dict[str, Service] = {}
    for name in (BASE, *SWITCHES):
        data_dir = bench.run_dir / f"variant-{name.replace(' ', '-')}"
        put(data_dir, conversation)
        without = () if name == BASE else (name,)
        try:
            services[name] = await bench.launch(data_dir, without=without, gc_log=data_dir / "gc.json")
        except RuntimeError:
            bench.row(f"without {name}", {}, "not measured: that optimisation is not in this code")
            continue
        await bench.warm_up(services[name], turns=2)
    return services, conversation["id"]


async def run(bench: Bench) -> None:
    services, cid = await start_all(bench)

    def turn(service: Service) -> Step:
        async def step() -> float:
            started = time.perf_counter()
            await service_turn(bench.client, service.url, "openai", cid, "a short question")
            return time.perf_counter() - started

        return step

    def stream(service: Service) -> Step:
        async def step() -> Timing:
            return await service_stream(bench.client, service.url, "openai", "chunks=5000")

        return step

    turns = await bench.measure({n: turn(s) for n, s in services.items()}, REPEATS, bench.count(10, 2))
    streams = await bench.measure({n: stream(s) for n, s in services.items()}, REPEATS, bench.count(3, 1))
    for service in services.values():
        bench.stop(service)  # SIGTERM: the service exits normally and writes its gc log
    gc_logs = {n: json.loads((s.data_dir / "gc.json").read_text()) for n, s in services.items()}
    if "cache" in services:
        report(bench, "cache", turns.compare("cache", baseline=BASE), "turn in a 200-message conversation")
    if "first-yield" in services:
        report(
            bench, "first-yield", streams.compare("first-yield", "first", BASE), "first delta of 5,000 chunks"
        )
    for name, log in gc_logs.items():
        cells = {
            f"gen{g} {what}": fmt_ms(log[f"gen{g}"][key]) if key != "count" else str(log[f"gen{g}"][key])
            for g in (2, 1, 0)
            for what, key in (("count", "count"), ("CPU ms", "total_ms"), ("longest ms", "max_ms"))
        }
        note = "over start-up and both workloads"
        bench.row(
            f"service {name if name == BASE else 'without ' + name}", cells, note, table="garbage collection"
        )
    bench.results["gc"] = gc_logs


def report(bench: Bench, name: str, comparison: Comparison, what: str) -> None:
    cells = {
        "as is p50 / p99": comparison.baseline.cell(),
        "without p50 / p99": comparison.other.cell(),
        "it saves (p50)": ", ".join(fmt_ms(a) for a in comparison.added),
    }
    bench.row(f"without {name}: {what}", cells, "saved per repeat, ms (negative: faster without it)")
    bench.results[f"without_{name}"] = vars(comparison)


SCENARIO = Scenario("optimisations", "the cache, gc.freeze and the pump's yield, each switched off", run)
