"""Appending a turn to conversations of 10, 100 and 1,000 messages, in-process (`storage.Store`).

What the service's storage does per turn (`append_turn` then `finish_reply`: two durable writes of
the whole file, the locks, the journal), against its floor: two bare durable writes of the same
file. No HTTP, no provider.
"""

from __future__ import annotations

import random
import time

import storage
from bench.conversations import MODEL, PARAMS, make_conversation, put, text_of
from bench.harness import Bench, Scenario
from bench.stats import fmt_ms

SIZES = {10: 25, 100: 25, 1000: 15}  # messages: samples
REPEATS = 5


async def one_size(bench: Bench, store: storage.Store, messages: int, samples: int) -> None:
    rng = random.Random(messages)
    conversation = make_conversation(messages, 600, rng)
    path = put(store.data_dir, conversation)
    original = path.read_bytes()
    user_text, reply_text = text_of(600, rng), text_of(600, rng)

    async def two_writes() -> float:
        path.write_bytes(original)  # the same size every time
        started = time.perf_counter()
        storage.write_durably(path, original)
        storage.write_durably(path, original)
        return time.perf_counter() - started

    async def append() -> float:
        path.write_bytes(original)
        started = time.perf_counter()
        record = await store.append_turn(
            conversation["id"], user_text, lambda _: storage.placeholder_reply(MODEL, PARAMS.copy())
        )
        final: storage.Message = {**record.reply, "content": reply_text, "status": "complete"}
        await store.finish_reply(conversation["id"], final)
        return time.perf_counter() - started

    rounds = max(1, bench.count(samples, 10) // REPEATS)
    measured = await bench.measure({"direct": two_writes, "service": append}, REPEATS, rounds)
    comparison = measured.compare("service")
    size = len(original) // 1024
    note = f"Store.append_turn + finish_reply; direct: 2 bare durable writes of {size} KB"
    bench.compared(f"append a turn, {messages:,} messages (in-process)", comparison, note)
    bench.results[f"append_{messages}"] = vars(comparison)
    if messages == 1000:
        p50, p99 = comparison.other.p50, comparison.other.p99
        bench.target(
            "Append to a 1,000-message conversation (p50, durable)",
            "< 15 ms",
            f"{fmt_ms(p50)} ms (p99 {fmt_ms(p99)}; 2 bare writes {fmt_ms(comparison.baseline.p50)} ms)",
            p50 < 15,
        )


async def run(bench: Bench) -> None:
    store = storage.Store(bench.run_dir / "append-data")
    store.open()
    for messages, samples in SIZES.items():
        await one_size(bench, store, messages, samples)


SCENARIO = Scenario("append", "appending a turn in-process to 10/100/1,000-message conversations", run)
