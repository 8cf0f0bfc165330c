"""The anchor (`--vs-litellm`): the same exchanges straight with the fake, through LiteLLM's proxy
and through the service, side by side.

Non-streaming: one short question, a new conversation each time in the service (so its file stays
small: two durable writes per turn). Streaming: replies of 50 and 1,000 chunks. LiteLLM and the
direct path speak the OpenAI API; the service's non-streaming turn still streams from upstream.
"""

from __future__ import annotations

import time
from functools import partial

from bench.exchanges import Timing, chat_completion, service_stream, service_turn
from bench.harness import Bench, Measured, Scenario
from bench.litellm import MASTER_KEY

REPEATS = 5
QUESTION = [{"role": "user", "content": "how is the weather today?"}]


async def run(bench: Bench) -> None:
    service = await bench.service()
    proxy = await bench.litellm()
    direct_url = bench.upstream.url + "/v1"

    async def turn() -> float:
        started = time.perf_counter()
        await service_turn(bench.client, service.url, "openai", None, QUESTION[0]["content"])
        return time.perf_counter() - started

    steps = {
        "direct": partial(chat_completion, bench.client, direct_url, QUESTION, False),
        "LiteLLM": partial(chat_completion, bench.client, proxy, QUESTION, False, MASTER_KEY),
        "service": turn,
    }
    measured = await bench.measure(steps, REPEATS, bench.count(10, 2), warmup=5)  # type: ignore[arg-type]
    row(
        bench,
        "non-streaming turn, c=1",
        measured,
        "total",
        "service: POST /api/chat, a new conversation each",
    )
    for chunks in (50, 1000):
        ask = [{"role": "user", "content": f"chunks={chunks}"}]

        async def through(chunks: int = chunks) -> Timing:
            return await service_stream(bench.client, service.url, "openai", f"chunks={chunks}")

        steps = {
            "direct": partial(chat_completion, bench.client, direct_url, ask, True),
            "LiteLLM": partial(chat_completion, bench.client, proxy, ask, True, MASTER_KEY),
            "service": through,
        }
        measured = await bench.measure(steps, REPEATS, bench.count(2 if chunks > 50 else 4, 1), warmup=2)  # type: ignore[arg-type]
        row(bench, f"stream {chunks:,} chunks: first delta", measured, "first")
        row(bench, f"stream {chunks:,} chunks: total", measured, "total")


def row(bench: Bench, name: str, measured: Measured, metric: str, note: str = "") -> None:
    litellm, ours = measured.compare("LiteLLM", metric), measured.compare("service", metric)
    bench.row(name, {**litellm.cells("LiteLLM"), **ours.cells("service")}, note)
    bench.results[f"litellm_{name}"] = {"litellm": vars(litellm), "service": vars(ours)}


SCENARIO = Scenario(
    "litellm", "three-way: direct, LiteLLM's proxy, the service (--vs-litellm)", run, default=False
)
