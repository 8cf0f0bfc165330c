"""The dispatch table: a chat request for `provider/model` becomes a stream of text deltas.

Every provider yields `str` deltas and then one `Finish` (reason and token usage). The SDKs open
the connection (auth, base URL, error bodies); the per-chunk work reads the raw event stream and
decodes each event with orjson, which is several times cheaper than the SDKs' typed iterators.
SDK and transport exceptions are translated here into a few `ProviderError`s that carry the HTTP
status the API answers. An SDK is imported (in a worker thread) when its provider is first used.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib
import logging
import math
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio.to_thread
import orjson

log = logging.getLogger("chat.providers")

RETRY_STATUSES = frozenset({500, 502, 503, 504, 529})
RETRY_DELAY = 0.5  # seconds before the one retry of a failed connection or 5xx
MODELS_TIMEOUT = 3.0
MODELS_TTL = 300.0
MODELS_FAILURE_TTL = 30.0


# --- what a provider consumes and produces ------------------------------------------------------


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True)
class ChatRequest:
    model: str  # the provider's own model name (after the first slash)
    messages: list[ChatMessage]
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()  # stop sequences


@dataclass
class Finish:
    reason: str | None  # in the provider's own vocabulary ("stop", "end_turn", "length", ...)
    input_tokens: int | None = None
    output_tokens: int | None = None
    stop_sequence: str | None = None  # which stop sequence ended the reply, where the provider says


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    idle: float = 120.0  # longest silence while waiting for the first or the next token


# --- errors -------------------------------------------------------------------------------------


class ProviderError(Exception):
    status_code = 502
    type = "provider_error"

    def __init__(self, detail: str, *, retry_after: str | None = None, retryable: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.retryable = retryable  # safe to try once more before anything reached the client


class UnknownProvider(ProviderError):
    status_code = 400
    type = "unknown_provider"


class ProviderNotConfigured(ProviderError):
    status_code = 400
    type = "provider_not_configured"


class ProviderRejected(ProviderError):
    """The upstream refused the request itself (bad parameter, context too long)."""

    status_code = 400
    type = "provider_rejected"


class ModelNotFound(ProviderError):
    status_code = 404
    type = "model_not_found"


class ProviderAuthFailed(ProviderError):
    status_code = 502
    type = "provider_auth_failed"


class ProviderRateLimited(ProviderError):
    status_code = 429
    type = "rate_limited"


class ProviderSpendLimit(ProviderError):
    """A 429 that waiting will not fix: the account's spend limit."""

    status_code = 429
    type = "spend_limit_reached"


class ProviderUnavailable(ProviderError):
    status_code = 502
    type = "provider_unavailable"


class ProviderMalformed(ProviderError):
    status_code = 502
    type = "provider_malformed_reply"


class ProviderTimeout(ProviderError):
    status_code = 504
    type = "provider_timeout"


# --- server-sent events -------------------------------------------------------------------------


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, bytes]]:
    """Yield (event name, data) for each event of a text/event-stream body."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        while (end := buffer.find(b"\n\n")) >= 0:
            block, buffer = buffer[:end], buffer[end + 2 :]
            event, data = b"message", []
            for line in block.split(b"\n"):
                name, _, value = line.partition(b":")
                value = value[1:] if value[:1] == b" " else value
                if name == b"data":
                    data.append(value)
                elif name == b"event":
                    event = value
            if data:
                yield event, b"\n".join(data)


async def drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows the final event, so the connection goes back to the pool for the next turn."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            async for _ in chunks:
                pass


# --- helpers shared by both wire formats --------------------------------------------------------


def upstream_message(body: object) -> str:
    """The human message inside an error body of either provider."""
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping):
            return upstream_message(inner)
        message = body.get("message")
        if isinstance(message, str):
            return message
    return ""


def retry_after(headers: Mapping[str, str]) -> str | None:
    """Seconds to wait, as a Retry-After value, from `retry-after-ms` or `retry-after` (seconds or date)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        with contextlib.suppress(ValueError):
            return str(max(0, math.ceil(float(ms) / 1000)))
    value = headers.get("retry-after")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return str(max(0, math.ceil(float(value))))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return str(max(0, math.ceil(when.timestamp() - time.time())))
    return None


# --- providers ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Provider:
    """One entry of the dispatch table. Subclasses speak one wire format."""

    name: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    key_env_var: str | None = None  # where the user sets the key; None: no key needed
    fallback_models: tuple[str, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    sdk: str = ""
    _client: Any = field(default=None, init=False, repr=False)
    _models: tuple[float, list[str], str] | None = field(default=None, init=False, repr=False)
    _refresh: asyncio.Task[Any] | None = field(default=None, init=False, repr=False)

    @property
    def configured(self) -> bool:
        return self.key_env_var is None or bool(self.api_key)

    @property
    def where(self) -> str:
        """The base URL without credentials or query (a URL may carry a key): safe to log and show."""
        parts = urllib.parse.urlsplit(self.base_url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"

    @property
    def hint(self) -> str:
        """What the user does to make this provider work."""
        if not self.configured:
            return f"set {self.key_env_var} to use {self.name}"
        return f"{self.name} at {self.where}"

    async def client(self) -> Any:
        """The SDK client, built once and reused; the SDK is imported off the event loop."""
        if self._client is None:
            module = await anyio.to_thread.run_sync(importlib.import_module, self.sdk)
            if self._client is None:
                self._client = self.build_client(module)
        return self._client

    def build_client(self, module: Any) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # streaming

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | Finish]:
        """Text deltas, then one Finish. Raises ProviderError, never an SDK exception.

        A connection failure or a 5xx is tried once more, but only while nothing has been yielded:
        a retry never repeats text the client has already seen.
        """
        if not self.configured:
            raise ProviderNotConfigured(f"{self.name} is not configured: set {self.key_env_var}")
        client = await self.client()
        for attempt in (1, 2):
            yielded = False
            try:
                async with self.open_stream(client, request) as response:
                    chunks = response.http_response.aiter_bytes()
                    async for item in self.parse(sse_events(chunks)):
                        if isinstance(item, Finish):
                            await drain(chunks)
                        yielded = True
                        yield item
                return
            except ProviderError as exc:
                error = exc
            except Exception as exc:
                error = self.translate(exc, request.model)
                error.__cause__ = exc
            if yielded or attempt == 2 or not error.retryable:
                raise error
            log.info("%s: %s; retrying once", self.name, error.detail)
            await asyncio.sleep(RETRY_DELAY)

    def open_stream(self, client: Any, request: ChatRequest) -> contextlib.AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def count_tokens(self, request: ChatRequest) -> int | None:
        """The provider's own count of a request's input tokens; None where it offers none."""
        return None

    def parse(self, events: AsyncIterator[tuple[bytes, bytes]]) -> AsyncIterator[str | Finish]:
        raise NotImplementedError

    # models

    async def models(self) -> tuple[list[str], str]:
        """(model names, "upstream" or "fallback"), asked with a short timeout and cached."""
        if self._models is not None and self._models[0] > time.monotonic():
            return self._models[1], self._models[2]
        try:
            client = await self.client()
            page = await client.models.list(timeout=MODELS_TIMEOUT)
            names, source, ttl = sorted(m.id for m in page.data), "upstream", MODELS_TTL
        except Exception as exc:
            log.info("%s: could not list models (%s); using the fallback list", self.name, type(exc).__name__)
            names, source, ttl = list(self.fallback_models), "fallback", MODELS_FAILURE_TTL
        self._models = (time.monotonic() + ttl, names, source)
        return names, source

    def models_now(self) -> list[str]:
        """The cached listing (or the fallbacks) at once; a stale one is refreshed in the background."""
        fresh = self._models is not None and self._models[0] > time.monotonic()
        if not fresh and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self.models())
        return self._models[1] if self._models is not None else list(self.fallback_models)

    # errors

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "[redacted]") if self.api_key else text

    def translate(self, exc: BaseException, model: str) -> ProviderError:
        """Map an SDK, transport or decoding exception to a ProviderError."""
        status = getattr(exc, "status_code", None)
        name = type(exc).__name__
        if isinstance(status, int) and status != 200:
            headers = getattr(getattr(exc, "response", None), "headers", {}) or {}
            body = getattr(exc, "body", None)
            code = getattr(exc, "error_code", None) or getattr(exc, "code", None)
            return self.from_status(status, self.redact(upstream_message(body)), model, headers, code)
        if name == "APITimeoutError" and type(exc.__cause__).__name__ == "ConnectTimeout":
            name = "ConnectTimeout"  # the SDK wraps connect and read timeouts alike
        if name in ("APIConnectionError", "ConnectError", "ConnectTimeout"):
            return ProviderUnavailable(
                f"could not connect to {self.name} at {self.where}: is it running?", retryable=True
            )
        if "Timeout" in name:
            return ProviderTimeout(
                f"{self.name} sent nothing for {self.timeouts.idle:g} s; try again, or raise "
                f"CHAT_STREAM_IDLE_TIMEOUT for slow local models"
            )
        if isinstance(exc, (orjson.JSONDecodeError, KeyError, TypeError, AttributeError)):
            return ProviderMalformed(f"{self.name} sent a reply that could not be read ({name})")
        if "Error" in name and type(exc).__module__.startswith("httpx"):
            return ProviderUnavailable(
                f"the connection to {self.name} broke off mid-reply ({name}); try again", retryable=True
            )
        return self.from_stream_error(exc)

    def from_status(
        self, status: int, message: str, model: str, headers: Mapping[str, str], code: object = None
    ) -> ProviderError:
        said = f": {message}" if message else ""
        if status in (400, 413, 422):
            return ProviderRejected(f"{self.name} rejected the request{said}")
        if status in (401, 403):
            where = f"check {self.key_env_var}" if self.key_env_var else "check the server's key"
            return ProviderAuthFailed(f"{self.name} refused this service's API key ({status}); {where}")
        if status == 404:
            which = repr(model) if model else "by that name"
            return ModelNotFound(f"{self.name} has no model {which}; see GET /api/models{said}")
        if status == 429:
            if isinstance(code, str) and "spend_limit" in code:
                return ProviderSpendLimit(
                    f"{self.name} spend limit reached{said}; raise it with the provider"
                )
            wait = retry_after(headers)
            after = f"; retry after {wait} s" if wait is not None else ""
            return ProviderRateLimited(
                f"{self.name} is rate limiting requests{after}{said}", retry_after=wait
            )
        if status == 408:
            return ProviderTimeout(f"{self.name} timed out{said}")
        return ProviderUnavailable(
            f"{self.name} failed ({status}){said}; try again shortly", retryable=status in RETRY_STATUSES
        )

    def from_stream_error(self, exc: BaseException) -> ProviderError:
        return ProviderUnavailable(f"{self.name} failed: {self.redact(str(exc)) or type(exc).__name__}")


@dataclass(eq=False)
class OpenAICompatible(Provider):
    """OpenAI, and any server that speaks its Chat Completions API (Ollama, llama.cpp, LM Studio, vLLM)."""

    sdk: str = "openai"
    max_tokens_field: str = "max_tokens"  # OpenAI's own API wants max_completion_tokens

    def build_client(self, module: Any) -> Any:
        timeout = module.Timeout(self.timeouts.idle, connect=self.timeouts.connect)
        # Local servers need no key, but the SDK refuses to start without one (llm does the same).
        return module.AsyncOpenAI(
            api_key=self.api_key or "no-key-needed", base_url=self.base_url, timeout=timeout, max_retries=0
        )

    def open_stream(self, client: Any, request: ChatRequest) -> contextlib.AbstractAsyncContextManager[Any]:
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages += [{"role": m.role, "content": m.content} for m in request.messages]
        body: dict[str, Any] = {"messages": messages, "stream_options": {"include_usage": True}}
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body[self.max_tokens_field] = request.max_tokens
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop"] = list(request.stop)
        # The SDK walks every message of `messages=` through its type-driven transform, ~0.2 ms each
        # (a 2,000-message history took 400 ms); `extra_body` is sent as is and takes precedence.
        return client.chat.completions.with_streaming_response.create(  # type: ignore[no-any-return]
            model=request.model, messages=[], stream=True, extra_body=body
        )

    async def parse(self, events: AsyncIterator[tuple[bytes, bytes]]) -> AsyncIterator[str | Finish]:
        finish = Finish(reason=None)
        done = False
        async for _, data in events:
            if data == b"[DONE]":
                done = True
                break
            chunk = orjson.loads(data)
            if "error" in chunk:
                raise self.from_chunk_error(chunk["error"])
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text
                finish.reason = choice.get("finish_reason") or finish.reason
            if usage := chunk.get("usage"):
                finish.input_tokens = usage.get("prompt_tokens")
                finish.output_tokens = usage.get("completion_tokens")
        if not done and finish.reason is None:
            raise ProviderUnavailable(
                f"{self.name} ended the stream before the reply was finished; try again"
            )
        yield finish

    def from_chunk_error(self, error: object) -> ProviderError:
        message = self.redact(upstream_message(error))
        kind = error.get("type") if isinstance(error, Mapping) else None
        if kind in ("rate_limit_error", "rate_limit_exceeded"):
            return ProviderRateLimited(f"{self.name} is rate limiting requests: {message}")
        if kind == "invalid_request_error":
            return ProviderRejected(f"{self.name} rejected the request: {message}")
        return ProviderUnavailable(f"{self.name} failed mid-reply: {message or kind}")


# the HTTP status each Anthropic error type comes with, for errors that arrive mid-stream
ANTHROPIC_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "overloaded_error": 529,
}


@dataclass(eq=False)
class Anthropic(Provider):
    """Anthropic's Messages API: system at top level, max_tokens required, strict alternation."""

    sdk: str = "anthropic"
    default_max_tokens: int = 4096

    def build_client(self, module: Any) -> Any:
        timeout = module.Timeout(self.timeouts.idle, connect=self.timeouts.connect)
        return module.AsyncAnthropic(
            api_key=self.api_key, base_url=self.base_url, timeout=timeout, max_retries=0
        )

    def open_stream(self, client: Any, request: ChatRequest) -> contextlib.AbstractAsyncContextManager[Any]:
        options: dict[str, Any] = {}
        if request.system:
            options["system"] = request.system
        if request.stop:
            options["stop_sequences"] = list(request.stop)
        # The SDK has no temperature or top_p arguments; the API version decides whether they are accepted.
        sampling = {"temperature": request.temperature, "top_p": request.top_p}
        if extra := {k: v for k, v in sampling.items() if v is not None}:
            options["extra_body"] = extra
        return client.messages.with_streaming_response.create(  # type: ignore[no-any-return]
            model=request.model,
            max_tokens=request.max_tokens or self.default_max_tokens,
            messages=alternating(request.messages),
            stream=True,
            **options,
        )

    async def count_tokens(self, request: ChatRequest) -> int | None:
        client = await self.client()
        options = {"system": request.system} if request.system else {}
        try:
            counted = await client.messages.count_tokens(
                model=request.model, messages=alternating(request.messages), **options
            )
        except Exception as exc:
            raise self.translate(exc, request.model) from exc
        return int(counted.input_tokens)

    async def parse(self, events: AsyncIterator[tuple[bytes, bytes]]) -> AsyncIterator[str | Finish]:
        finish = Finish(reason=None)
        async for _, data in events:
            event = orjson.loads(data)
            kind = event["type"]
            if kind == "content_block_delta":
                delta = event["delta"]
                if delta.get("type") == "text_delta" and delta["text"]:
                    yield delta["text"]
            elif kind == "message_start":
                usage = event["message"].get("usage") or {}
                finish.input_tokens = usage.get("input_tokens")
                finish.output_tokens = usage.get("output_tokens")
            elif kind == "message_delta":
                finish.reason = event["delta"].get("stop_reason") or finish.reason
                finish.stop_sequence = event["delta"].get("stop_sequence")
                finish.output_tokens = (event.get("usage") or {}).get("output_tokens", finish.output_tokens)
            elif kind == "message_stop":
                yield finish
                return
            elif kind == "error":
                raise self.from_event_error(event.get("error") or {})
        raise ProviderUnavailable(f"{self.name} ended the stream before the reply was finished; try again")

    def from_event_error(self, error: Mapping[str, Any]) -> ProviderError:
        """An `event: error` mid-stream: classify by its type (the HTTP status was already 200)."""
        kind = str(error.get("type") or "api_error")
        message = self.redact(upstream_message(error))
        return self.from_status(ANTHROPIC_ERROR_STATUS.get(kind, 500), message, "", {})


def alternating(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """A history Anthropic accepts: starts with a user turn, no empty turns, roles alternate."""
    turns: list[dict[str, str]] = []
    for message in messages:
        if not message.content:
            continue
        if turns and turns[-1]["role"] == message.role:
            turns[-1]["content"] += "\n\n" + message.content
        elif turns or message.role == "user":
            turns.append({"role": message.role, "content": message.content})
    return turns


# --- the dispatch table -------------------------------------------------------------------------

ProviderTable = dict[str, Provider]


def resolve(table: ProviderTable, model: str) -> tuple[Provider, str]:
    """Split `provider/model` at the first slash and find the provider."""
    name, slash, model_name = model.partition("/")
    if not slash or not name or not model_name:
        raise UnknownProvider(
            f"model {model!r} must be named provider/model, e.g. openai/gpt-4o-mini; "
            f"providers: {', '.join(sorted(table))}"
        )
    provider = table.get(name)
    if provider is None:
        raise UnknownProvider(f"unknown provider {name!r}; choose one of: {', '.join(sorted(table))}")
    if not provider.configured:
        raise ProviderNotConfigured(
            f"{name} is not configured: set the {provider.key_env_var} environment variable"
        )
    return provider, model_name


async def close_all(table: ProviderTable) -> None:
    for provider in table.values():
        with contextlib.suppress(Exception):
            await provider.aclose()
