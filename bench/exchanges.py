"""One exchange each, timed: straight with the fake upstream ("direct"), through the service, and
through any OpenAI-compatible proxy (LiteLLM). Each returns its timings in seconds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx2
import orjson

from bench.processes import API_KEY, MODELS

Format = Literal["openai", "anthropic"]
History = list[dict[str, str]]


class StreamFailed(Exception):
    pass


@dataclass
class Timing:
    first: float  # time to the first delta (the total for a non-streaming exchange)
    total: float
    deltas: int = 0
    text: str = ""


def upstream_request(upstream_url: str, fmt: Format, history: History) -> tuple[str, dict[str, Any]]:
    """The request the service makes upstream for this history (URL, JSON body)."""
    if fmt == "openai":
        body = {
            "model": MODELS["openai"],
            "messages": history,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return upstream_url + "/v1/chat/completions", body
    body = {"model": MODELS["anthropic"], "max_tokens": 4096, "messages": history, "stream": True}
    return upstream_url + "/v1/messages", body


def upstream_headers(fmt: Format) -> dict[str, str]:
    if fmt == "openai":
        return {"Authorization": f"Bearer {API_KEY}"}
    return {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}


def delta_text(fmt: Format, line: str) -> str | None:
    """The text of an SSE data line if it is a delta; None for any other line."""
    if fmt == "openai":
        if '"delta":{"content":' not in line:
            return None
        text: str = orjson.loads(line[6:])["choices"][0]["delta"]["content"]
        return text
    if '"text_delta"' not in line:
        return None
    text = orjson.loads(line[6:])["delta"]["text"]
    return text


async def direct_stream(
    client: httpx2.AsyncClient, upstream_url: str, fmt: Format, history: History
) -> Timing:
    """The streaming exchange the service makes upstream, made straight with the fake."""
    url, body = upstream_request(upstream_url, fmt, history)
    end = "data: [DONE]" if fmt == "openai" else '"type":"message_stop"'
    started = time.perf_counter()
    timing = Timing(0.0, 0.0)
    parts: list[str] = []
    async with client.stream("POST", url, json=body, headers=upstream_headers(fmt)) as response:
        if response.status_code != 200:
            raise StreamFailed(f"upstream answered {response.status_code}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if end in line:
                break
            if (text := delta_text(fmt, line)) is not None:
                parts.append(text)
                if not timing.deltas:
                    timing.first = time.perf_counter() - started
                timing.deltas += 1
        else:
            raise StreamFailed("the upstream stream ended before its end marker")
    timing.total = time.perf_counter() - started
    timing.text = "".join(parts)
    return timing


async def direct_turn(
    client: httpx2.AsyncClient, upstream_url: str, fmt: Format, history: History, text: str
) -> float:
    """A turn made straight with the fake; `history` grows as the service's conversation does."""
    history.append({"role": "user", "content": text})
    timing = await direct_stream(client, upstream_url, fmt, history)
    history.append({"role": "assistant", "content": timing.text})
    return timing.total


async def service_turn(
    client: httpx2.AsyncClient, service_url: str, fmt: Format, conversation: str | None, text: str
) -> str:
    """A non-streaming turn through the service; returns the conversation id."""
    body: dict[str, Any] = {"message": text, "model": f"{fmt}/{MODELS[fmt]}"}
    if conversation is not None:
        body["conversation_id"] = conversation
    response = await client.post(service_url + "/api/chat", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"POST /api/chat answered {response.status_code}: {response.text[:300]}")
    conversation_id: str = orjson.loads(response.content)["conversation_id"]
    return conversation_id


async def service_stream(client: httpx2.AsyncClient, service_url: str, fmt: Format, text: str) -> Timing:
    """A streaming turn through the service, read to its `done` event."""
    body = {"message": text, "model": f"{fmt}/{MODELS[fmt]}", "stream": True}
    started = time.perf_counter()
    timing = Timing(0.0, 0.0)
    event = ""
    async with client.stream("POST", service_url + "/api/chat", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise StreamFailed(f"POST /api/chat answered {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif not line.startswith("data: "):
                continue
            elif event == "delta":
                timing.deltas += 1
                if timing.deltas == 1:
                    timing.first = time.perf_counter() - started
            elif event == "done":
                break
            elif event == "error":
                raise StreamFailed(f"the service sent an error event: {line[6:300]}")
        else:
            raise StreamFailed(f"the service's stream ended without `done` ({timing.deltas} deltas)")
    timing.total = time.perf_counter() - started
    return timing


async def chat_completion(
    client: httpx2.AsyncClient,
    base_url: str,
    history: History,
    stream: bool,
    key: str = API_KEY,
    model: str = MODELS["openai"],
) -> Timing:
    """One OpenAI chat completion (`base_url` ends in /v1): straight with the fake or through a proxy
    (the service's `/v1` takes `openai/<model>`). Non-streaming: `first` and `total` are both the
    whole exchange."""
    body: dict[str, Any] = {"model": model, "messages": history}
    headers = {"Authorization": f"Bearer {key}"}
    url = base_url + "/chat/completions"
    started = time.perf_counter()
    if not stream:
        response = await client.post(url, json=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"POST {url} answered {response.status_code}: {response.text[:300]}")
        took = time.perf_counter() - started
        text = orjson.loads(response.content)["choices"][0]["message"]["content"] or ""
        return Timing(took, took, 1, text)
    body["stream"] = True
    timing = Timing(0.0, 0.0)
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            raise StreamFailed(f"POST {url} answered {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                break
            if not line.startswith("data: "):
                continue
            choices = orjson.loads(line[6:]).get("choices") or [{}]  # a proxy may order keys its way
            if (choices[0].get("delta") or {}).get("content"):
                timing.deltas += 1
                if timing.deltas == 1:
                    timing.first = time.perf_counter() - started
        else:
            raise StreamFailed(f"{url} ended its stream before [DONE]")
    timing.total = time.perf_counter() - started
    return timing
