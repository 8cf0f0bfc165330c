"""`/v1` with the real clients: the openai and anthropic SDKs (sync and async) and simonw's `llm`.

The service runs under uvicorn on loopback (the SDKs speak real HTTP); the fake upstream stands in
for the providers, so every test also checks what reached the upstream.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import anthropic
import fastapi
import httpx2
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

import main
import wire
from tests.conftest import TOKEN, ledger_lines, settings_for
from tests.fake_upstream import FakeUpstream, Reply
from tokens import estimate_messages
from wire_formats import OpenAIChatIn

Serve = Callable[..., str]


@pytest.fixture
def serve(upstream: FakeUpstream, data_dir: Path) -> Iterator[Serve]:
    """serve(**settings) -> the base URL of the service running under uvicorn on loopback."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: Any) -> str:
        app = main.create_app(settings_for(upstream, data_dir, **overrides))
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, ws="none", lifespan="on"))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def url(serve: Serve) -> str:
    return serve()


@pytest.fixture
def oai() -> Iterator[Callable[..., openai.OpenAI]]:
    """oai(url, **options) -> an openai client of the service, closed after the test."""
    clients: list[openai.OpenAI] = []

    def make(url: str, **options: Any) -> openai.OpenAI:
        key = options.pop("api_key", "any-key")
        clients.append(openai.OpenAI(api_key=key, base_url=url + "/v1", max_retries=0, **options))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def ant() -> Iterator[Callable[..., anthropic.Anthropic]]:
    """ant(url, **options) -> an anthropic client of the service, closed after the test."""
    clients: list[anthropic.Anthropic] = []

    def make(url: str, **options: Any) -> anthropic.Anthropic:
        key = options.pop("api_key", "any-key")
        clients.append(anthropic.Anthropic(api_key=key, base_url=url, max_retries=0, **options))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


OAI = Callable[..., openai.OpenAI]
ANT = Callable[..., anthropic.Anthropic]


# --- OpenAI Chat Completions --------------------------------------------------------------------


def test_openai_sdk_gets_a_whole_reply_with_its_parameters_passed_on(
    url: str, upstream: FakeUpstream, oai: OAI
) -> None:
    upstream.script(Reply(text="Hello there", usage=(11, 2)))
    reply = oai(url).chat.completions.create(
        model="openai/fake-gpt-1",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "how "}, {"type": "text", "text": "are you"}],
            },
        ],
        temperature=0.5,
        top_p=0.9,
        max_completion_tokens=50,
        stop=["END"],
        user="someone",
        store=False,
    )
    assert reply.object == "chat.completion"
    assert reply.model == "openai/fake-gpt-1"
    assert reply.choices[0].message.content == "Hello there"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (11, 2, 13)
    sent = upstream.requests[0].body
    assert sent["model"] == "fake-gpt-1"
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
    ]
    assert (sent["temperature"], sent["top_p"], sent["max_completion_tokens"], sent["stop"]) == (
        0.5,
        0.9,
        50,
        ["END"],
    )
    assert "user" not in sent and "store" not in sent


def test_openai_sdk_streams_role_content_finish_usage_in_order(
    url: str, upstream: FakeUpstream, oai: OAI
) -> None:
    upstream.script(Reply(text="one two three", usage=(5, 3)))
    chunks = list(
        oai(url).chat.completions.create(
            model="openai/fake-gpt-1",
            messages=[{"role": "user", "content": "count"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert "".join(t or "" for t in texts) == "one two three" and all(texts)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 3)
    assert all(c.object == "chat.completion.chunk" and c.model == "openai/fake-gpt-1" for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_the_stream_ends_with_done_and_carries_no_usage_unless_asked(
    url: str, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(text="a b"))
    body = {"model": "openai/fake-gpt-1", "messages": [{"role": "user", "content": "x"}], "stream": True}
    response = httpx2.post(url + "/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block]
    assert events[-1] == "data: [DONE]"
    assert all(block.startswith("data: {") for block in events[:-1])
    assert '"usage"' not in response.text


def test_a_claude_model_through_the_openai_sdk_async(url: str, upstream: FakeUpstream) -> None:
    upstream.script(Reply(text="I am Claude", finish_reason="max_tokens"), Reply(text="streamed reply"))

    async def talk() -> tuple[Any, list[Any]]:
        client = openai.AsyncOpenAI(api_key="k", base_url=url + "/v1", max_retries=0)
        messages: Any = [{"role": "system", "content": "sys"}, {"role": "user", "content": "who?"}]
        whole = await client.chat.completions.create(
            model="anthropic/claude-fake-1", messages=messages, max_tokens=7, stop="STOP"
        )
        stream = await client.chat.completions.create(
            model="anthropic/claude-fake-1", messages=messages, stream=True
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
        return whole, chunks

    whole, chunks = asyncio.run(talk())
    assert whole.choices[0].message.content == "I am Claude"
    assert whole.choices[0].finish_reason == "length"  # Anthropic's max_tokens, in OpenAI's words
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "streamed reply"
    assert chunks[-1].choices[0].finish_reason == "stop"  # end_turn
    sent = upstream.requests[0]
    assert sent.path == "/v1/messages"
    assert sent.body["system"] == "sys" and sent.body["max_tokens"] == 7
    assert sent.body["stop_sequences"] == ["STOP"]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"n": 2}, "n other than 1"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
                ]
            },
            "'image_url'",
        ),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "tool"),
    ],
)
def test_openai_features_not_offered_yet_are_a_bad_request(
    url: str, upstream: FakeUpstream, extra: dict[str, Any], words: str, oai: OAI
) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        oai(url).chat.completions.create(model="openai/fake-gpt-1", **body)
    assert words in caught.value.message and "not supported" in caught.value.message
    assert caught.value.code == "not_supported"
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("content", "content_type", "words"),
    [
        (b"", "application/json", "a JSON body is required"),
        (b'{"model": "openai/fake-gpt-1"}', "text/plain", "Content-Type: application/json"),
        (b'{"model": "openai/fake-gpt-1", "messages": [', "application/json", "Invalid JSON"),
        (b'{"model": "openai/fake-gpt-1", "messages": [{"role": "robot", "content": "hi"}]}', None, "role"),
        (b'{"model": 7, "messages": []}', None, "model: Input should be a valid string"),
    ],
)
def test_bad_bodies_are_a_bad_request_in_the_clients_format(
    url: str, upstream: FakeUpstream, content: bytes, content_type: str | None, words: str
) -> None:
    """WireRoute's own body handling: each refusal is a 400 naming the place, in either format."""
    headers = {"content-type": content_type or "application/json"}
    openai_answer = httpx2.post(url + "/v1/chat/completions", content=content, headers=headers)
    assert openai_answer.status_code == 400
    error = openai_answer.json()["error"]
    assert words in error["message"] and error["code"] == "invalid_request"
    assert error["type"] == "invalid_request_error"
    anthropic_answer = httpx2.post(url + "/v1/messages", content=content, headers=headers)
    assert anthropic_answer.status_code == 400
    assert anthropic_answer.json()["type"] == "error"
    assert anthropic_answer.json()["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []


async def plain(body: OpenAIChatIn, request: fastapi.Request) -> Any:
    return None


async def one_more(body: OpenAIChatIn, request: fastapi.Request, x: int = 0) -> Any:
    return None


def blocking(body: OpenAIChatIn, request: fastapi.Request) -> Any:
    return None


async def guarded(
    body: Annotated[OpenAIChatIn, fastapi.Depends(lambda: None)], request: fastapi.Request
) -> Any:
    return None


@pytest.mark.parametrize(
    ("endpoint", "router_options"),
    [
        (one_more, {}),
        (blocking, {}),
        (guarded, {}),
        (plain, {"dependencies": [fastapi.Depends(lambda: None)]}),
    ],
)
def test_a_wire_route_refuses_what_its_handler_would_skip(
    endpoint: Any, router_options: dict[str, Any]
) -> None:
    """WireRoute's handler runs no dependencies: a route that has any, or another signature, fails
    when it is added, instead of being served without them."""
    router = fastapi.APIRouter(route_class=wire.WireRoute, **router_options)
    with pytest.raises(TypeError, match="WireRoute runs none"):
        router.add_api_route("/x", endpoint, methods=["POST"])


def test_a_wire_route_refuses_its_inclusions_dependencies() -> None:
    router = fastapi.APIRouter(route_class=wire.WireRoute)
    router.add_api_route("/x", plain, methods=["POST"])
    app = fastapi.FastAPI()
    app.include_router(router, dependencies=[fastapi.Depends(lambda: None)])
    with TestClient(app) as client, pytest.raises(TypeError, match="WireRoute runs none"):
        client.post("/x", json={"model": "m", "messages": []})  # FastAPI builds an inclusion's routes then


def test_a_body_that_starts_with_a_byte_order_mark_is_read(url: str, upstream: FakeUpstream) -> None:
    body = b'\xef\xbb\xbf{"model": "openai/fake-gpt-1", "messages": [{"role": "user", "content": "hi"}]}'
    answer = httpx2.post(
        url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "You said: hi"


def test_openai_errors_map_to_the_sdk_exception_classes(url: str, upstream: FakeUpstream, oai: OAI) -> None:
    client = oai(url)
    hi: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nobody/model", messages=hi)
    assert "unknown provider 'nobody'" in missing.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="openai/missing-model", messages=hi)
    with pytest.raises(openai.BadRequestError) as invalid:
        client.chat.completions.create(model="openai/fake-gpt-1", messages=hi, temperature=5)
    assert "temperature" in invalid.value.message and invalid.value.code == "invalid_request"
    upstream.script(Reply(status=429, headers={"retry-after": "7"}))
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="openai/fake-gpt-1", messages=hi, stream=True)
    assert limited.value.response.headers["retry-after"] == "7"
    upstream.script(Reply(status=401))
    with pytest.raises(openai.InternalServerError) as upstream_auth:  # our key, not the client's
        client.chat.completions.create(model="openai/fake-gpt-1", messages=hi)
    assert upstream_auth.value.response.headers["x-should-retry"] == "false"


def test_an_error_mid_stream_reaches_the_openai_sdk(url: str, upstream: FakeUpstream, oai: OAI) -> None:
    upstream.script(Reply(text="one two three four", mode="midstream_error"))
    seen = []
    stream = oai(url).chat.completions.create(
        model="openai/fake-gpt-1", messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "one two "
    assert "The server had an error" in caught.value.message  # what the upstream said, passed on


# --- Anthropic Messages -------------------------------------------------------------------------


def test_an_openai_compatible_model_through_the_anthropic_sdk(
    url: str, upstream: FakeUpstream, ant: ANT
) -> None:
    upstream.script(Reply(text="local answer", usage=(9, 2), finish_reason="length"))
    message = ant(url).messages.create(
        model="lmstudio/fake-gpt-1",
        max_tokens=20,
        system=[{"type": "text", "text": "Be local.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
            {"role": "user", "content": "where are you?"},
        ],
        stop_sequences=["\n\n"],
        metadata={"user_id": "u1"},
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "lmstudio/fake-gpt-1"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "local answer")]
    assert message.stop_reason == "max_tokens"  # OpenAI's length, in Anthropic's words
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 2)
    sent = upstream.requests[0].body
    assert sent["messages"][0] == {"role": "system", "content": "Be local."}
    assert sent["messages"][-1] == {"role": "user", "content": "where are you?"}
    assert sent["max_tokens"] == 20 and sent["stop"] == ["\n\n"]
    assert "metadata" not in sent


def test_anthropic_sdk_streams_the_event_sequence_async(url: str, upstream: FakeUpstream) -> None:
    upstream.script(Reply(text="stream me please", usage=(4, 3), finish_reason="stop_sequence"))

    async def talk() -> tuple[list[str], Any]:
        client = anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0)
        async with client.messages.stream(
            model="anthropic/claude-fake-1",
            max_tokens=30,
            messages=[{"role": "user", "content": "go"}],
            stop_sequences=["###"],
        ) as stream:
            kinds: list[str] = [event.type async for event in stream]
            final = await stream.get_final_message()
        await client.close()
        return kinds, final

    kinds, final = asyncio.run(talk())
    raw = [k for k in kinds if k not in ("text",)]  # the SDK adds its own `text` events
    assert raw == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert final.content[0].text == "stream me please"
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "###")
    assert (final.usage.input_tokens, final.usage.output_tokens) == (4, 3)
    assert upstream.requests[0].body["stop_sequences"] == ["###"]


def test_the_raw_anthropic_stream_has_a_ping_after_the_block_start(url: str, upstream: FakeUpstream) -> None:
    upstream.script(Reply(text="x y"))
    body = {
        "model": "ollama/fake-gpt-2",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "q"}],
    }
    response = httpx2.post(url + "/v1/messages", json=body)
    assert response.status_code == 200
    names = [line[7:] for line in response.text.split("\n") if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": "image/png", "data": ""},
                            }
                        ],
                    }
                ]
            },
            "'image'",
        ),
    ],
)
def test_anthropic_features_not_offered_yet_are_a_bad_request(
    url: str, upstream: FakeUpstream, extra: dict[str, Any], words: str, ant: ANT
) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(anthropic.BadRequestError) as caught:
        ant(url).messages.create(model="anthropic/claude-fake-1", max_tokens=5, **body)
    body = caught.value.response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == "invalid_request_error"
    assert words in body["error"]["message"] and "not supported" in body["error"]["message"]
    assert upstream.requests == []


def test_anthropic_errors_map_to_the_sdk_exception_classes(
    url: str, upstream: FakeUpstream, ant: ANT
) -> None:
    client = ant(url)
    hi: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-without-provider", max_tokens=5, messages=hi)
    with pytest.raises(anthropic.BadRequestError) as invalid:
        client.messages.create(model="anthropic/claude-fake-1", max_tokens=0, messages=hi)
    assert "max_tokens" in invalid.value.message
    upstream.script(Reply(status=429, error_code="spend_limit_reached"))
    with pytest.raises(anthropic.RateLimitError) as spent:
        client.messages.create(model="anthropic/claude-fake-1", max_tokens=5, messages=hi)
    assert spent.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in spent.value.response.headers
    upstream.script(Reply(status=529), Reply(status=529))  # the provider layer tries twice
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        client.messages.create(model="anthropic/claude-fake-1", max_tokens=5, messages=hi, stream=True)
    assert overloaded.value.status_code == 502 and isinstance(overloaded.value, anthropic.InternalServerError)


def test_count_tokens_is_anthropics_count_or_the_projects_estimate(
    url: str, upstream: FakeUpstream, ant: ANT
) -> None:
    system = "You are terse."
    messages: Any = [{"role": "user", "content": "How many tokens is this sentence?"}]
    local = ant(url).messages.count_tokens(model="ollama/fake-gpt-1", system=system, messages=messages)
    assert local.input_tokens == estimate_messages([system, messages[0]["content"]])
    assert upstream.requests == []
    counted = ant(url).messages.count_tokens(
        model="anthropic/claude-fake-1", system=system, messages=messages
    )
    assert upstream.requests[0].path == "/v1/messages/count_tokens"
    assert upstream.requests[0].body["model"] == "claude-fake-1"
    assert counted.input_tokens == 9  # the fake counts words: 3 in the system prompt, 6 in the message
    with pytest.raises(anthropic.NotFoundError):
        ant(url).messages.count_tokens(model="anthropic/missing-model", messages=messages)


# --- errors from the service itself, auth, models -----------------------------------------------


def test_refusals_before_the_route_come_in_the_clients_format(serve: Serve, oai: OAI, ant: ANT) -> None:
    url = serve(CHAT_API_TOKEN=TOKEN, CHAT_MAX_BODY_BYTES=2048)
    hi: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as denied:
        oai(url, api_key="wrong").chat.completions.create(model="openai/fake-gpt-1", messages=hi)
    assert denied.value.code == "unauthorized"
    with pytest.raises(anthropic.AuthenticationError):
        ant(url, api_key="wrong").messages.create(model="openai/fake-gpt-1", max_tokens=5, messages=hi)
    with pytest.raises(anthropic.RequestTooLargeError):
        ant(url, api_key=TOKEN).messages.create(
            model="openai/fake-gpt-1", max_tokens=5, messages=[{"role": "user", "content": "x" * 4000}]
        )
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        oai(url, api_key=TOKEN, default_headers={"Origin": "http://evil.example"}).models.list()
    assert forbidden.value.code == "forbidden_origin"
    assert oai(url, api_key=TOKEN).chat.completions.create(model="openai/fake-gpt-1", messages=hi).choices
    by_header = httpx2.get(url + "/v1/models", headers={"x-api-key": TOKEN})
    assert by_header.status_code == 200
    assert httpx2.get(url + "/api/conversations", headers={"x-api-key": TOKEN}).status_code == 401  # /v1 only


def test_without_a_token_any_key_is_accepted(url: str, upstream: FakeUpstream, ant: ANT) -> None:
    upstream.script(Reply(text="ok"))
    message = ant(url, api_key="whatever").messages.create(
        model="openai/fake-gpt-1", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text == "ok"  # type: ignore[union-attr]


def test_models_answer_at_once_then_from_the_refreshed_listing(
    url: str, upstream: FakeUpstream, oai: OAI, ant: ANT
) -> None:
    first = [m.id for m in oai(url).models.list()]
    assert "openai/gpt-4o-mini" in first and "anthropic/claude-sonnet-4-6" in first  # the fallbacks
    deadline = time.monotonic() + 30
    # every provider's refresh (each arrives in its own time; the two listings below must agree)
    refreshed = {
        "openai/fake-gpt-1",
        "openai/fake-gpt-2",
        "ollama/fake-gpt-1",
        "lmstudio/fake-gpt-1",
        "anthropic/claude-fake-1",
    }
    while not refreshed <= set(ids := [m.id for m in oai(url).models.list()]):
        assert time.monotonic() < deadline, "the background refresh never arrived"
        time.sleep(0.05)
    page = ant(url).models.list()
    assert [m.id for m in page.data] == ids and page.has_more is False
    assert page.first_id == ids[0] and page.last_id == ids[-1]


# --- a client that goes away --------------------------------------------------------------------


def test_a_stream_closed_by_the_client_closes_the_upstream(
    url: str, upstream: FakeUpstream, oai: OAI
) -> None:
    upstream.script(Reply(text=" ".join(["word"] * 200), chunk_delay=0.05))
    stream = oai(url).chat.completions.create(
        model="openai/fake-gpt-1", messages=[{"role": "user", "content": "long"}], stream=True
    )
    for seen, _ in enumerate(stream):
        if seen == 3:
            break
    stream.close()
    assert upstream.wait_closed(0, timeout=30) is not None
    assert upstream.requests[0].body["stream"] is True


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_whole_reply_abandoned_by_the_client_closes_the_upstream(
    url: str, upstream: FakeUpstream, path: str
) -> None:
    upstream.script(Reply(text="never finished", mode="stall_mid"))
    body = b'{"model":"anthropic/claude-fake-1","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 30
        while not upstream.requests:
            assert time.monotonic() < deadline, "the provider was never called"
            time.sleep(0.01)
    assert upstream.wait_closed(0, timeout=30) is not None


# --- simonw's llm -------------------------------------------------------------------------------


def test_llm_chats_through_it(url: str, upstream: FakeUpstream, tmp_path: Path) -> None:
    home = tmp_path / "llm"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: here-claude\n  model_name: anthropic/claude-fake-1\n  api_base: {url}/v1\n"
    )
    env = {"LLM_USER_PATH": str(home), "PATH": str(Path(sys.executable).parent)}
    llm = [str(Path(sys.executable).parent / "llm")]
    first = subprocess.run(
        [*llm, "-m", "here-claude", "hello there"], env=env, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "You said: hello there"
    again = subprocess.run(
        [*llm, "-c", "--no-stream", "and again"], env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "You said: and again"
    assert [m["content"] for m in upstream.requests[1].body["messages"]] == [
        "hello there",
        "You said: hello there",
        "and again",
    ]


# --- X-Conversation-Id --------------------------------------------------------------------------


def saved_messages(url: str, conversation_id: str) -> list[tuple[str, str, str | None]]:
    response = httpx2.get(f"{url}/api/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    return [(m["role"], m["content"], m.get("status")) for m in response.json()["messages"]]


def test_a_conversation_keeps_the_newest_message_and_the_reply_once(
    url: str, upstream: FakeUpstream, oai: OAI, ant: ANT
) -> None:
    first = oai(url).chat.completions.with_raw_response.create(
        model="openai/fake-gpt-1",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Conversation-Id": "new"},
    )
    conversation_id = first.headers["x-conversation-id"]
    assert first.parse().choices[0].message.content == "You said: hi"
    history: Any = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "You said: hi"},
        {"role": "user", "content": "more"},
    ]
    with ant(url).messages.stream(
        model="anthropic/claude-fake-1",
        max_tokens=20,
        messages=history,
        extra_headers={"X-Conversation-Id": conversation_id},
    ) as stream:
        assert stream.response.headers["x-conversation-id"] == conversation_id
        assert stream.get_final_text() == "You said: more"
    assert saved_messages(url, conversation_id) == [
        ("user", "hi", None),
        ("assistant", "You said: hi", "complete"),
        ("user", "more", None),
        ("assistant", "You said: more", "complete"),
    ]
    assert [m["content"] for m in upstream.requests[1].body["messages"]] == ["hi", "You said: hi", "more"]


def test_a_conversation_that_does_not_exist_is_not_found(url: str, upstream: FakeUpstream, oai: OAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai(url).chat.completions.create(
            model="openai/fake-gpt-1",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Conversation-Id": "0" * 32},
        )
    assert caught.value.code == "conversation_not_found"
    assert upstream.requests == []


def test_a_remembered_stream_abandoned_by_the_client_is_saved_as_incomplete(
    url: str, upstream: FakeUpstream, oai: OAI
) -> None:
    upstream.script(Reply(text=" ".join(["word"] * 200), chunk_delay=0.05))
    response = oai(url).chat.completions.with_streaming_response.create(
        model="openai/fake-gpt-1",
        messages=[{"role": "user", "content": "long"}],
        stream=True,
        extra_headers={"X-Conversation-Id": "new"},
    )
    with response as raw:
        conversation_id = raw.headers["x-conversation-id"]
        for seen, _ in enumerate(raw.parse()):
            if seen == 3:
                break
    assert upstream.wait_closed(0, timeout=30) is not None
    deadline = time.monotonic() + 30
    while (saved := saved_messages(url, conversation_id))[-1][1] == "":  # the placeholder until the save
        assert time.monotonic() < deadline, saved
        time.sleep(0.05)
    assert saved[0] == ("user", "long", None)
    assert saved[1][1].startswith("word word") and saved[1][2] == "incomplete"


def test_v1_calls_are_counted_and_obey_budgets(
    serve: Serve, upstream: FakeUpstream, oai: OAI, ant: ANT, data_dir: Path
) -> None:
    url = serve(
        CHAT_PRICES={"openai/*": {"input": 100, "output": 100}},
        CHAT_BUDGETS={"openai": {"day": 0.5}},
    )
    upstream.script(
        Reply(text="costly", usage=(5_000, 0)), Reply(text="cut short", chunks=4, mode="drop_mid")
    )
    client = oai(url)
    client.chat.completions.create(model="openai/fake-gpt-1", messages=[{"role": "user", "content": "hi"}])
    lines = ledger_lines(data_dir, 1)
    assert [(x["provider"], x["input_tokens"], x["cost"], x["conversation_id"]) for x in lines] == [
        ("openai", 5_000, pytest.approx(0.5), None)
    ]
    with pytest.raises(openai.RateLimitError) as caught:  # the day's $0.50 is spent
        client.chat.completions.create(
            model="openai/fake-gpt-1", messages=[{"role": "user", "content": "more"}]
        )
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in caught.value.response.headers
    assert "budget" in str(caught.value)
    with pytest.raises(anthropic.APIError):  # a reply cut short still counts, estimated
        ant(url).messages.create(
            model="lmstudio/m", max_tokens=50, messages=[{"role": "user", "content": "and you?"}]
        )
    lines = ledger_lines(data_dir, 2)
    assert len(lines) == 2 and lines[1]["provider"] == "lmstudio" and lines[1]["estimated"] is True
