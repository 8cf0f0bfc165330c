"""The `/v1` routes: the same OpenAI chat completion straight with the fake, through the service's
`/v1/chat/completions`, and (for scale) as a turn of its own API, side by side.

Non-streaming: one short question (stateless on `/v1`: nothing is written; the `/api/chat` turn
writes twice). Streaming: a reply of 1,000 chunks, whose cost per chunk should be no higher on
`/v1` than on `/api/chat`.
"""

from __future__ import annotations

import time
from functools import partial

from bench.exchanges import Timing, chat_completion, service_stream, service_turn
from bench.harness import Bench, Measured, Scenario
from bench.processes import MODELS

REPEATS = 5
QUESTION = [{"role": "user", "content": "how is the weather today?"}]
MODEL = "openai/" + MODELS["openai"]


async def run(bench: Bench) -> None:
    service = await bench.service()
    direct_url, v1_url = bench.upstream.url + "/v1", service.url + "/v1"

    async def api_turn() -> float:
        started = time.perf_counter()
        await service_turn(bench.client, service.url, "openai", None, QUESTION[0]["content"])
        return time.perf_counter() - started

    steps = {
        "direct": partial(chat_completion, bench.client, direct_url, QUESTION, False),
        "/v1": partial(chat_completion, bench.client, v1_url, QUESTION, False, model=MODEL),
        "/api/chat": api_turn,
    }
    measured = await bench.measure(steps, REPEATS, bench.count(20, 4), warmup=5)  # type: ignore[arg-type]
    row(
        bench,
        "non-streaming call, c=1",
        measured,
        "total",
        "/v1: stateless; /api/chat: a new conversation each",
    )
    v1 = measured.compare("/v1")
    bench.target(
        "/v1 added p50 per call, c=1",
        "< 1 ms",
        f"{min(v1.added):.1f}-{max(v1.added):.1f} ms over repeats",
        max(v1.added) < 1.0,
    )

    ask = [{"role": "user", "content": "chunks=1000"}]

    async def api_stream() -> Timing:
        return await service_stream(bench.client, service.url, "openai", "chunks=1000")

    steps = {
        "direct": partial(chat_completion, bench.client, direct_url, ask, True),
        "/v1": partial(chat_completion, bench.client, v1_url, ask, True, model=MODEL),
        "/api/chat": api_stream,
    }
    measured = await bench.measure(steps, REPEATS, bench.count(3, 1), warmup=2)  # type: ignore[arg-type]
    row(bench, "stream 1,000 chunks: total", measured, "total")
    v1_added = min(measured.compare("/v1").added)
    api_added = min(measured.compare("/api/chat").added)
    bench.target(
        "/v1 cost per streamed chunk no higher than /api/chat's",
        "<= /api/chat",
        f"{v1_added:.0f} µs vs {api_added:.0f} µs a chunk (best repeat)",
        v1_added <= api_added * 1.1,
    )


def row(bench: Bench, name: str, measured: Measured, metric: str, note: str = "") -> None:
    v1, api = measured.compare("/v1", metric), measured.compare("/api/chat", metric)
    bench.row(name, {**v1.cells("/v1"), **api.cells("/api/chat")}, note)
    bench.results[f"v1_{name}"] = {"v1": vars(v1), "api": vars(api)}


SCENARIO = Scenario("v1", "the /v1 routes against direct calls and /api/chat", run)
