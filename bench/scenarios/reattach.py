"""Re-attaching to a reply still being written (`GET .../messages/{id}/stream`).

A slow reply (500 deltas, 10 ms apart) is started with `on_disconnect: "continue"`; the client
reads the `start` event and leaves, then re-attaches several times while the reply runs. Measured:
the time from the re-attach request to its first event carrying text (the text so far). Direct:
the time to the first delta of a fresh stream straight from the fake (the cheapest "first text"
there is). Also reported: whether the reply was saved `complete` though no client read it to the end.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from bench.harness import Bench, Scenario
from bench.processes import MODELS
from bench.stats import Stats, fmt_ms

ATTACHES = 20


async def run(bench: Bench) -> None:
    service = await bench.service()
    body = {
        "message": "chunks=500 delay=0.01",
        "model": "openai/" + MODELS["openai"],
        "stream": True,
        "on_disconnect": "continue",
    }
    started: dict[str, str] = {}
    async with bench.client.stream("POST", service.url + "/api/chat", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                started = orjson.loads(line[6:])
                break  # leave: the reply goes on without us
    cid, mid = started["conversation_id"], started["message_id"]
    url = f"{service.url}/api/conversations/{cid}/messages/{mid}/stream"
    samples: list[float] = []
    for _ in range(ATTACHES):
        await asyncio.sleep(0.1)
        began = time.perf_counter()
        async with bench.client.stream("GET", url) as attached:
            async for line in attached.aiter_lines():
                if line.startswith("data: ") and '"text"' in line:
                    samples.append(time.perf_counter() - began)
                    break
    direct: list[float] = []
    for _ in range(ATTACHES):
        began = time.perf_counter()
        upstream = bench.upstream.url + "/v1/chat/completions"
        ask = {
            "model": MODELS["openai"],
            "messages": [{"role": "user", "content": "chunks=5"}],
            "stream": True,
        }
        async with bench.client.stream("POST", upstream, json=ask) as streamed:
            async for line in streamed.aiter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    direct.append(time.perf_counter() - began)
                    break
    saved = None
    for _ in range(200):  # the reply ends about 5 s after it started
        reply = orjson.loads((await bench.client.get(f"{service.url}/api/conversations/{cid}")).content)
        saved = reply["messages"][-1]
        if saved.get("status") != "generating":
            break
        await asyncio.sleep(0.1)
    ours, base = Stats.of(samples), Stats.of(direct)
    bench.row(
        "re-attach to a running reply: first text",
        {"direct p50 / p99": base.cell(), "service p50 / p99": ours.cell()},
        f"{ATTACHES} re-attaches; direct: first delta of a fresh stream from the fake; "
        f"reply saved as {saved.get('status') if saved else None} with no reader",
    )
    bench.results["reattach"] = {"service": vars(ours), "direct": vars(base)}
    bench.target("Re-attach to a running reply (p50)", "< 10 ms", f"{fmt_ms(ours.p50)} ms", ours.p50 < 10)


SCENARIO = Scenario("reattach", "re-attaching to a reply still being written", run)
