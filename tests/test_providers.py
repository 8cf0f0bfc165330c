"""Providers with the real openai/anthropic SDKs over real HTTP against the fake upstream."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any

import pytest

import providers
from providers import (
    Anthropic,
    ChatMessage,
    ChatRequest,
    Finish,
    ModelNotFound,
    OpenAICompatible,
    ProviderAuthFailed,
    ProviderError,
    ProviderMalformed,
    ProviderNotConfigured,
    ProviderRateLimited,
    ProviderRejected,
    ProviderSpendLimit,
    ProviderTimeout,
    ProviderUnavailable,
    Timeouts,
    UnknownProvider,
    alternating,
    resolve,
    sse_events,
)
from tests.conftest import ANTHROPIC_KEY, OPENAI_KEY
from tests.fake_upstream import FakeUpstream, Reply

FAST = Timeouts(connect=2.0, idle=0.5)


def openai_provider(upstream: FakeUpstream, **kwargs: Any) -> OpenAICompatible:
    return OpenAICompatible(
        "openai", upstream.openai_base_url, OPENAI_KEY, key_env_var="OPENAI_API_KEY", timeouts=FAST, **kwargs
    )


def anthropic_provider(upstream: FakeUpstream) -> Anthropic:
    return Anthropic(
        "anthropic",
        upstream.anthropic_base_url,
        ANTHROPIC_KEY,
        key_env_var="ANTHROPIC_API_KEY",
        timeouts=FAST,
    )


def request(model: str = "fake-model", text: str = "Hello there", **kwargs: Any) -> ChatRequest:
    return ChatRequest(model=model, messages=[ChatMessage("user", text)], **kwargs)


async def collect(provider: providers.Provider, req: ChatRequest) -> tuple[str, Finish]:
    parts: list[str] = []
    finish: Finish | None = None
    try:
        async for item in provider.stream(req):
            if isinstance(item, Finish):
                finish = item
            else:
                parts.append(item)
    finally:
        await provider.aclose()
    assert finish is not None
    return "".join(parts), finish


def run(coro: Any) -> Any:
    return asyncio.run(coro)


BOTH = pytest.mark.parametrize("kind", ["openai", "anthropic"])


def make(kind: str, upstream: FakeUpstream) -> providers.Provider:
    return openai_provider(upstream) if kind == "openai" else anthropic_provider(upstream)


# --- streaming ----------------------------------------------------------------------------------


@BOTH
def test_stream_yields_deltas_then_finish_with_usage(kind: str, upstream: FakeUpstream) -> None:
    upstream.script(Reply(text="The quick brown fox", chunks=4, usage=(11, 4)))
    text, finish = run(collect(make(kind, upstream), request()))
    assert text == "The quick brown fox"
    assert finish.input_tokens == 11
    assert finish.output_tokens == 4
    assert finish.reason == ("stop" if kind == "openai" else "end_turn")


def test_openai_request_on_the_wire(upstream: FakeUpstream) -> None:
    provider = openai_provider(upstream, max_tokens_field="max_completion_tokens")
    run(collect(provider, request(system="Be brief.", temperature=0.7, max_tokens=99)))
    sent = upstream.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert sent.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    assert sent.body["temperature"] == 0.7
    assert sent.body["max_completion_tokens"] == 99
    assert sent.body["stream_options"] == {"include_usage": True}


def test_keyless_local_server_gets_a_placeholder_key(upstream: FakeUpstream) -> None:
    provider = OpenAICompatible("ollama", upstream.openai_base_url, timeouts=FAST)
    assert provider.configured
    text, _ = run(collect(provider, request(text="hi")))
    assert text == "You said: hi"
    assert upstream.requests[-1].headers["authorization"] == "Bearer no-key-needed"


def test_anthropic_request_on_the_wire(upstream: FakeUpstream) -> None:
    history = [
        ChatMessage("assistant", "stray greeting"),
        ChatMessage("user", "one"),
        ChatMessage("assistant", ""),
        ChatMessage("user", "two"),
    ]
    req = ChatRequest(model="claude-fake-1", messages=history, system="Be brief.", temperature=0.3)
    run(collect(anthropic_provider(upstream), req))
    sent = upstream.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"
    assert "anthropic-version" in sent.headers
    assert sent.body["system"] == "Be brief."
    assert sent.body["temperature"] == 0.3
    assert sent.body["max_tokens"] == 4096
    assert sent.body["messages"] == [{"role": "user", "content": "one\n\ntwo"}]


def test_alternating_history() -> None:
    messages = [
        ChatMessage("user", "a"),
        ChatMessage("assistant", "b"),
        ChatMessage("assistant", "c"),
        ChatMessage("user", "d"),
        ChatMessage("assistant", ""),
        ChatMessage("user", "e"),
    ]
    assert alternating(messages) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b\n\nc"},
        {"role": "user", "content": "d\n\ne"},
    ]


@BOTH
def test_turns_reuse_one_upstream_connection(kind: str, upstream: FakeUpstream) -> None:
    provider = make(kind, upstream)

    async def three() -> None:
        try:
            for _ in range(3):
                async for _ in provider.stream(request()):
                    pass
        finally:
            await provider.aclose()

    run(three())
    assert len({r.connection for r in upstream.requests}) == 1


def test_the_client_is_built_once_and_reused(upstream: FakeUpstream) -> None:
    provider = openai_provider(upstream)

    async def twice() -> tuple[Any, Any]:
        first = await provider.client()
        async for _ in provider.stream(request()):
            pass
        second = await provider.client()
        await provider.aclose()
        return first, second

    first, second = run(twice())
    assert first is second


# --- errors -------------------------------------------------------------------------------------

ERRORS: list[tuple[Reply, type[ProviderError]]] = [
    (Reply(status=400, error_message="prompt is too long"), ProviderRejected),
    (Reply(status=401), ProviderAuthFailed),
    (Reply(status=403), ProviderAuthFailed),
    (Reply(status=429, headers={"retry-after": "3"}), ProviderRateLimited),
    (Reply(mode="midstream_error", text="a b c d"), ProviderUnavailable),
    (Reply(mode="drop_before_first"), ProviderUnavailable),
    (Reply(mode="drop_mid", text="a b c d"), ProviderUnavailable),
    (Reply(mode="stall_headers"), ProviderTimeout),
    (Reply(mode="stall_mid", text="a b c d"), ProviderTimeout),
    (Reply(mode="malformed"), ProviderMalformed),
]


@BOTH
@pytest.mark.parametrize(("reply", "expected"), ERRORS, ids=[f"{r.status}-{r.mode}" for r, _ in ERRORS])
def test_errors_become_provider_errors(
    kind: str, reply: Reply, expected: type[ProviderError], upstream: FakeUpstream
) -> None:
    upstream.script(reply, reply)
    with pytest.raises(expected) as raised:
        run(collect(make(kind, upstream), request()))
    assert raised.value.detail
    assert OPENAI_KEY not in raised.value.detail and ANTHROPIC_KEY not in raised.value.detail


@BOTH
def test_upstream_5xx_is_retried_once(kind: str, upstream: FakeUpstream) -> None:
    upstream.script(Reply(status=503), Reply(text="second time lucky"))
    text, _ = run(collect(make(kind, upstream), request()))
    assert text == "second time lucky"
    assert len(upstream.requests) == 2


@BOTH
def test_a_drop_before_the_first_token_is_retried_once(kind: str, upstream: FakeUpstream) -> None:
    upstream.script(Reply(mode="drop_before_first"), Reply(text="after the drop"))
    text, _ = run(collect(make(kind, upstream), request()))
    assert text == "after the drop"
    assert len(upstream.requests) == 2


@BOTH
def test_a_drop_after_text_is_not_retried(kind: str, upstream: FakeUpstream) -> None:
    upstream.script(Reply(mode="drop_mid", text="a b c d e f"), Reply(text="would repeat text"))
    with pytest.raises(ProviderUnavailable):
        run(collect(make(kind, upstream), request()))
    assert len(upstream.requests) == 1


def test_a_connect_timeout_says_it_could_not_connect() -> None:
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = [socket.socket() for _ in range(8)]
        for sock in fillers:  # fill the accept queue: later connects get no answer at all
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        provider = OpenAICompatible(
            "slow", f"http://127.0.0.1:{port}/v1", timeouts=Timeouts(connect=0.3, idle=0.3)
        )
        try:
            with pytest.raises(ProviderError) as raised:
                run(collect(provider, request()))
        finally:
            for sock in fillers:
                sock.close()
    assert "could not connect to slow" in raised.value.detail


@BOTH
def test_5xx_twice_is_unavailable(kind: str, upstream: FakeUpstream) -> None:
    upstream.script(Reply(status=500), Reply(status=500), Reply(text="never reached"))
    with pytest.raises(ProviderUnavailable):
        run(collect(make(kind, upstream), request()))
    assert len(upstream.requests) == 2


@BOTH
def test_rate_limit_is_not_retried_and_passes_retry_after(kind: str, upstream: FakeUpstream) -> None:
    upstream.script(Reply(status=429, headers={"retry-after": "12"}))
    started = time.monotonic()
    with pytest.raises(ProviderRateLimited) as raised:
        run(collect(make(kind, upstream), request()))
    assert time.monotonic() - started < 10  # no wait for the 12 s Retry-After
    assert raised.value.retry_after == "12"
    assert len(upstream.requests) == 1


def test_retry_after_forms() -> None:
    assert providers.retry_after({"retry-after": "3"}) == "3"
    assert providers.retry_after({"retry-after": "1.2"}) == "2"
    assert providers.retry_after({"retry-after-ms": "2500", "retry-after": "9"}) == "3"
    in_ten = formatdate(time.time() + 10, usegmt=True)
    assert providers.retry_after({"retry-after": in_ten}) in {"9", "10", "11"}
    assert providers.retry_after({"retry-after": "soon"}) is None
    assert providers.retry_after({}) is None


def test_anthropic_spend_limit_is_not_a_plain_rate_limit(upstream: FakeUpstream) -> None:
    upstream.script(Reply(status=429, error_code="enforced_spend_limit_reached"))
    with pytest.raises(ProviderSpendLimit) as raised:
        run(collect(anthropic_provider(upstream), request()))
    assert raised.value.retry_after is None
    assert len(upstream.requests) == 1


def test_anthropic_overloaded_529_is_unavailable(upstream: FakeUpstream) -> None:
    upstream.script(Reply(status=529), Reply(status=529))
    with pytest.raises(ProviderUnavailable) as raised:
        run(collect(anthropic_provider(upstream), request()))
    assert "529" in raised.value.detail
    assert len(upstream.requests) == 2  # tried once more


def test_an_anthropic_error_event_before_any_text_is_retried(upstream: FakeUpstream) -> None:
    upstream.script(Reply(mode="midstream_error", text="x", chunks=1), Reply(text="recovered"))
    text, _ = run(collect(anthropic_provider(upstream), request()))
    assert text == "recovered"
    assert len(upstream.requests) == 2


@BOTH
def test_unknown_model_is_model_not_found(kind: str, upstream: FakeUpstream) -> None:
    with pytest.raises(ModelNotFound) as raised:
        run(collect(make(kind, upstream), request(model="something-missing")))
    assert "something-missing" in raised.value.detail


def test_connection_refused_says_where(upstream: FakeUpstream) -> None:
    provider = OpenAICompatible("ollama", "http://127.0.0.1:9/v1", timeouts=FAST)
    with pytest.raises(ProviderUnavailable) as raised:
        run(collect(provider, request()))
    assert "could not connect to ollama at http://127.0.0.1:9/v1" in raised.value.detail


PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_chat_requests_go_through_the_proxy_the_environment_names(
    upstream: FakeUpstream, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """The fake upstream stands in for the proxy: it sees the absolute URL a proxy is asked for,
    and the proxy's credentials from its URL as Proxy-Authorization, never as the API's key."""
    proxy = upstream.base_url.replace("http://", "http://me:p%40ss@")
    clean_proxy_env.setenv("HTTP_PROXY", proxy)
    provider = OpenAICompatible("far", "http://chat.invalid/v1", "sk-far", timeouts=FAST)
    with pytest.raises(ProviderError):  # the fake knows no such path: what matters is that it was asked
        run(collect(provider, request()))
    sent = upstream.requests[-1]
    assert sent.path == "http://chat.invalid/v1/chat/completions"
    assert sent.headers["proxy-authorization"] == "Basic bWU6cEBzcw=="  # me:p@ss
    assert sent.headers["authorization"] == "Bearer sk-far"


def test_a_proxy_that_never_answers_connect_is_a_connect_timeout(clean_proxy_env: pytest.MonkeyPatch) -> None:
    """The connect timeout bounds the proxy's answer to CONNECT (and the DNS lookup), not just TCP."""
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        clean_proxy_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{silent.getsockname()[1]}")
        provider = OpenAICompatible("far", "https://chat.invalid/v1", "sk-far", timeouts=FAST)
        with pytest.raises(ProviderUnavailable) as raised:
            run(asyncio.wait_for(collect(provider, request()), 60))  # the bound only stops a hang
    assert "could not connect to far" in raised.value.detail


@pytest.mark.parametrize(
    ("env", "url", "expected"),
    [
        ({}, "http://localhost:11434/v1/chat/completions", None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "http://localhost:11434/v1", None),  # another scheme's
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https://api.openai.com/v1", "http://proxy:3128"),
        ({"ALL_PROXY": "proxy:3128"}, "https://api.openai.com/v1", "http://proxy:3128"),
        ({"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "localhost"}, "http://localhost:11434/v1", None),
        ({"https_proxy": "http://proxy:3128", "no_proxy": ".openai.com"}, "https://api.openai.com/v1", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "192.168.0.0/16"}, "http://192.168.1.20:8080/v1", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "*.corp.example"}, "http://gpu.corp.example/v1", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "[::1]"}, "http://[::1]:11434/v1", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "*"}, "http://gpu.corp.example/v1", None),
        (
            {"HTTP_PROXY": "http://p:1", "NO_PROXY": "gpu.corp.example"},
            "http://other.example/v1",
            "http://p:1",
        ),
    ],
)
def test_the_proxy_is_read_from_the_environment_as_httpx_reads_it(
    env: dict[str, str], url: str, expected: str | None, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        clean_proxy_env.setenv(name, value)
    proxy = providers.env_proxy(url)
    assert (proxy and proxy.url) == expected
    assert proxy is None or proxy.headers == {}


def test_a_query_in_the_base_url_stays_a_query(upstream: FakeUpstream) -> None:
    """Some gateways take their key or API version in the query: the chat path goes before it."""
    provider = OpenAICompatible(
        "gateway", upstream.openai_base_url + "?api-version=2025-01-01", timeouts=FAST
    )
    text, _ = run(collect(provider, request(text="hi")))
    assert text == "You said: hi"
    assert upstream.requests[-1].path == "/v1/chat/completions"


def test_credentials_in_a_base_url_are_never_shown() -> None:
    provider = OpenAICompatible("gpu", "https://user:hunter2@gpu.example:8443/v1?api-key=hunter2")
    assert provider.where == "https://gpu.example:8443/v1"
    assert "hunter2" not in provider.hint
    ipv6 = OpenAICompatible("v6", "http://[::1]:11434/v1")
    assert ipv6.where == "http://[::1]:11434/v1"


def test_upstream_message_echoing_the_key_is_redacted(upstream: FakeUpstream) -> None:
    upstream.script(Reply(status=400, error_message=f"Incorrect API key provided: {OPENAI_KEY}"))
    with pytest.raises(ProviderRejected) as raised:
        run(collect(openai_provider(upstream), request()))
    assert OPENAI_KEY not in raised.value.detail
    assert "[redacted]" in raised.value.detail


def test_an_unconfigured_provider_says_what_to_set(upstream: FakeUpstream) -> None:
    provider = OpenAICompatible("openai", upstream.openai_base_url, None, key_env_var="OPENAI_API_KEY")
    with pytest.raises(ProviderNotConfigured, match="OPENAI_API_KEY"):
        run(collect(provider, request()))
    assert upstream.requests == []


# --- closing early ------------------------------------------------------------------------------


@BOTH
def test_closing_the_stream_early_closes_the_upstream_connection(kind: str, upstream: FakeUpstream) -> None:
    upstream.script(Reply(text="x " * 2000, chunk_delay=0.02))  # 40 s if read to the end
    provider = make(kind, upstream)

    async def read_two() -> float:
        stream = provider.stream(request())
        assert isinstance(stream, AsyncIterator)
        seen = 0
        async for item in stream:
            seen += isinstance(item, str)
            if seen == 2:
                break
        await stream.aclose()
        closed_at = time.monotonic()
        await provider.aclose()
        return closed_at

    closed_at = run(read_two())
    upstream_closed = upstream.wait_closed(0, timeout=30)
    assert upstream_closed is not None
    assert upstream_closed - closed_at < 20


# --- the event-stream parser and the dispatch table ---------------------------------------------


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def parse(*parts: bytes) -> list[tuple[bytes, bytes]]:
    async def go() -> list[tuple[bytes, bytes]]:
        return [event async for event in sse_events(chunks_of(*parts))]

    result: list[tuple[bytes, bytes]] = asyncio.run(go())
    return result


def test_sse_parser_handles_splits_crlf_comments_and_multiline_data() -> None:
    assert parse(b'data: {"a"', b": 1}\n", b"\n") == [(b"message", b'{"a": 1}')]
    assert parse(b"event: ping\r\ndata: {}\r\n\r\n") == [(b"ping", b"{}")]
    assert parse(b": keep-alive\n\ndata: x\ndata: y\n\n") == [(b"message", b"x\ny")]
    assert parse(b"data:tight\n\n", b"event: e\ndata: z\n\n") == [(b"message", b"tight"), (b"e", b"z")]
    assert parse(b"data: unfinished") == []


def test_resolve_splits_at_the_first_slash(upstream: FakeUpstream) -> None:
    ollama = OpenAICompatible("ollama", upstream.openai_base_url)
    table: providers.ProviderTable = {"ollama": ollama, "openai": openai_provider(upstream)}
    assert resolve(table, "ollama/hf.co/user/model:Q4") == (ollama, "hf.co/user/model:Q4")
    for bad in ("ollama", "/model", "ollama/", "nobody/model"):
        with pytest.raises(UnknownProvider):
            resolve(table, bad)
    table["openai"].api_key = None
    with pytest.raises(ProviderNotConfigured, match="OPENAI_API_KEY"):
        resolve(table, "openai/gpt-4o")


def test_models_come_from_upstream_then_cache(upstream: FakeUpstream) -> None:
    provider = openai_provider(upstream)

    async def twice() -> list[tuple[list[str], str]]:
        try:
            return [await provider.models(), await provider.models()]
        finally:
            await provider.aclose()

    first, second = run(twice())
    assert first == (["fake-gpt-1", "fake-gpt-2"], "upstream")
    assert second == first
    assert len([r for r in upstream.requests if r.path == "/v1/models"]) == 1


def test_models_fall_back_when_the_upstream_fails(upstream: FakeUpstream) -> None:
    upstream.models_status = 503
    provider = openai_provider(upstream, fallback_models=("gpt-4o-mini",))

    async def once() -> tuple[list[str], str]:
        try:
            return await provider.models()
        finally:
            await provider.aclose()

    try:
        assert run(once()) == (["gpt-4o-mini"], "fallback")
    finally:
        upstream.models_status = 200


# --- local servers, cut streams, account headers, our own bugs ------------------------------------


@pytest.mark.parametrize("path", ["", "/"])
def test_an_openai_compatible_url_without_a_path_means_v1(path: str, upstream: FakeUpstream) -> None:
    provider = OpenAICompatible("ollama", upstream.base_url + path, timeouts=FAST)
    assert provider.base_url == upstream.base_url + "/v1"
    text, _ = run(collect(provider, request(text="hi")))
    assert text == "You said: hi"
    assert upstream.requests[-1].path == "/v1/chat/completions"


def test_a_stream_cut_before_the_first_token_asks_again_and_says_why(upstream: FakeUpstream) -> None:
    # llama-cpp-python cuts the stream of a history longer than its window without a word
    too_long = "Requested tokens (5000) exceed context window of 4096"
    upstream.script(
        Reply(mode="drop_before_first"),
        Reply(status=400, error_code="context_length_exceeded", error_message=too_long),
    )
    with pytest.raises(ProviderRejected) as raised:
        run(collect(OpenAICompatible("llama", upstream.openai_base_url, timeouts=FAST), request()))
    assert too_long in raised.value.detail
    assert "try again" not in raised.value.detail
    assert [r.body.get("stream") for r in upstream.requests] == [True, False]


@BOTH
def test_a_cut_stream_answered_without_streaming_is_the_reply(kind: str, upstream: FakeUpstream) -> None:
    upstream.script(Reply(mode="drop_before_first"), Reply(text="the whole reply", usage=(3, 3)))
    text, finish = run(collect(make(kind, upstream), request()))
    assert text == "the whole reply"
    assert (finish.input_tokens, finish.output_tokens) == (3, 3)
    assert upstream.requests[1].body.get("stream") is not True


def test_an_error_event_in_the_stream_says_what_it_says(upstream: FakeUpstream) -> None:
    said = "This model's maximum context length is 4096 tokens"
    upstream.script(
        Reply(mode="midstream_error", text="a b c d", error_type="invalid_request_error", error_message=said)
    )
    with pytest.raises(ProviderRejected) as raised:
        run(collect(openai_provider(upstream), request()))
    assert said in raised.value.detail
    assert "try again" not in raised.value.detail


def test_openai_insufficient_quota_is_a_spend_limit(upstream: FakeUpstream) -> None:
    upstream.script(
        Reply(
            status=429,
            error_type="insufficient_quota",
            error_code="insufficient_quota",
            error_message="You exceeded your current quota, please check your plan and billing details.",
        )
    )
    with pytest.raises(ProviderSpendLimit) as raised:
        run(collect(openai_provider(upstream), request()))
    assert "exceeded your current quota" in raised.value.detail
    assert len(upstream.requests) == 1


def test_openai_account_ids_go_to_openai_only(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_ORG_ID", "org-test-123")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-test-456")
    run(collect(openai_provider(upstream, sends_account_ids=True), request()))
    sent = upstream.requests[-1].headers
    assert (sent["openai-organization"], sent["openai-project"]) == ("org-test-123", "proj-test-456")
    for name in ("ollama", "lmstudio"):
        run(collect(OpenAICompatible(name, upstream.openai_base_url, timeouts=FAST), request()))
        sent = upstream.requests[-1].headers
        assert "openai-organization" not in sent and "openai-project" not in sent


def test_a_bug_of_ours_is_not_reported_as_the_providers_fault(upstream: FakeUpstream) -> None:
    class Buggy(OpenAICompatible):
        async def parse(self, events: AsyncIterator[tuple[bytes, bytes]]) -> AsyncIterator[str | Finish]:
            async for _, data in events:
                yield {"a": data.decode()}["missing"]  # a KeyError in our own code

    with pytest.raises(KeyError):
        run(collect(Buggy("buggy", upstream.openai_base_url, timeouts=FAST), request()))


def test_a_malformed_event_is_the_providers_fault(upstream: FakeUpstream) -> None:
    upstream.script(Reply(mode="malformed"), Reply(mode="malformed"))
    with pytest.raises(ProviderMalformed):
        run(collect(anthropic_provider(upstream), request()))


def test_sdk_clients_are_built_off_the_event_loop(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anthropic
    import openai

    built_in: list[threading.Thread] = []
    for module, name in ((openai, "AsyncOpenAI"), (anthropic, "AsyncAnthropic")):
        real = getattr(module, name)

        def spy(*args: Any, real: Any = real, **kwargs: Any) -> Any:
            built_in.append(threading.current_thread())
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    async def build_both() -> threading.Thread:
        for provider in (openai_provider(upstream), anthropic_provider(upstream)):
            await provider.client()
            await provider.aclose()
        return threading.current_thread()

    loop_thread = run(build_both())
    assert len(built_in) == 2
    assert loop_thread not in built_in
