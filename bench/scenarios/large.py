"""A conversation of 1,000 messages (about 930 KB) through the API: opening it, and a turn in it.

Direct for opening: reading and parsing the file in-process (`storage.parse_conversation`); for a
turn: the same upstream exchange (600 KB of history) made straight with the fake.
"""

from __future__ import annotations

import random
import time

import storage
from bench.conversations import make_conversation, put
from bench.exchanges import direct_turn, service_turn
from bench.harness import Bench, Scenario

REPEATS = 5


async def run(bench: Bench) -> None:
    service = await bench.service()
    conversation = make_conversation(1000, 600, random.Random(2))
    path = put(service.data_dir, conversation)
    cid = conversation["id"]
    url = f"{service.url}/api/conversations/{cid}"

    async def parse() -> float:
        started = time.perf_counter()
        storage.parse_conversation(path.read_bytes(), cid)
        return time.perf_counter() - started

    async def get() -> float:
        started = time.perf_counter()
        response = await bench.client.get(url)
        if response.status_code != 200:
            raise RuntimeError(f"GET {url} answered {response.status_code}")
        return time.perf_counter() - started

    measured = await bench.measure({"direct": parse, "service": get}, REPEATS, bench.count(10, 2))
    comparison = measured.compare("service")
    size = path.stat().st_size // 1024
    note = f"GET /api/conversations/{{id}}, {size} KB file; direct: read + parse in-process"
    bench.compared("open a 1,000-message conversation", comparison, note)
    bench.results["open_1000"] = vars(comparison)

    history = [{"role": m["role"], "content": m["content"]} for m in conversation["messages"]]

    async def direct() -> float:
        return await direct_turn(bench.client, bench.upstream.url, "openai", history, "a short question")

    async def through() -> float:
        started = time.perf_counter()
        await service_turn(bench.client, service.url, "openai", cid, "a short question")
        return time.perf_counter() - started

    measured = await bench.measure({"direct": direct, "service": through}, REPEATS, bench.count(4, 1))
    comparison = measured.compare("service")
    note = "POST /api/chat (600 KB history upstream); direct: the same upstream exchange"
    bench.compared("turn in a 1,000-message conversation", comparison, note)
    bench.results["turn_1000"] = vars(comparison)


SCENARIO = Scenario("large", "a 1,000-message conversation: open it, and a turn in it", run)
