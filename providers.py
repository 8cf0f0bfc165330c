"""The dispatch table: a chat request for `provider/model` becomes a stream of text deltas.

Every provider yields `str` deltas and then one `Finish` (reason and token usage). Each provider
builds its SDK's client once (auth, base URL, headers, timeouts). A chat request is posted with
the SDK's headers and a body encoded once with orjson, on an aiohttp session of the provider's
own (the transport the SDKs offer as their `aiohttp` extra), and its event stream is decoded here
with orjson: the SDK's request building and typed iterators, and httpx2's transport under them,
cost more than the rest of the exchange (BENCHMARKS.md). The SDK itself, on its default httpx2
client, serves everything else (listing models, counting tokens). SDK, HTTP and transport errors
are translated here into a few `ProviderError`s that carry the HTTP status the API answers. An
SDK and aiohttp are imported (in a worker thread) when a provider is first used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import importlib
import logging
import math
import sys
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
WINDOW_TIMEOUT = 3.0
WINDOW_FAILURE_TTL = 30.0
READ_SIZE = 65536  # the most of an event stream parsed at once, as httpx2 read it
CONNECTIONS = 1000  # per provider, as the SDKs' own pools allow
KEEPALIVE = 5.0  # seconds an idle connection is kept, as the SDKs' pools do (servers close theirs)
# Context windows (tokens) of hosted models, by name prefix, longest prefix first; from the
# providers' model pages. A model not listed has an unknown window: its history is sent whole.
KNOWN_WINDOWS: dict[str, tuple[tuple[str, int], ...]] = {
    "openai": (
        ("gpt-4.1", 1_047_576),
        ("gpt-4o", 128_000),
        ("gpt-4-turbo", 128_000),
        ("gpt-4", 8_192),
        ("gpt-3.5-turbo", 16_385),
        ("gpt-5", 400_000),
        ("o1", 200_000),
        ("o3", 200_000),
        ("o4-mini", 200_000),
    ),
    "anthropic": (("claude-", 200_000),),
}
SPEND_LIMIT_CODES = frozenset({"insufficient_quota", "billing_error"})  # a 429 that waiting won't fix


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


class ProviderUnreachable(ProviderUnavailable):
    """Nothing answered at the provider's address (connection refused or timed out)."""


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


async def reads(content: Any) -> AsyncIterator[bytes]:
    """A response body (an aiohttp `StreamReader`) as it arrives, at most `READ_SIZE` bytes at a
    time. aiohttp's `iter_any()` hands over everything it has buffered at once; from a fast
    upstream that is a few hundred KB, which `sse_events` slices event by event (a copy of the
    rest each time): a 5,000-chunk reply took 182 instead of 119 ms, its first delta 36 instead of
    32 ms (BENCHMARKS.md)."""
    while chunk := await content.read(READ_SIZE):
        yield chunk


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


def error_code(body: object) -> object:
    """The machine-readable code inside an error body of either provider, if any."""
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping):
            return error_code(inner)
        details = body.get("details")
        if isinstance(details, Mapping):
            return details.get("error_code")
        return body.get("code")
    return None


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """One event or body from the upstream as a JSON object, or ProviderMalformed."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ProviderMalformed(f"{what} sent a reply that could not be read (not a JSON object)")
    return value


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


@dataclass(frozen=True)
class Proxy:
    url: str  # without credentials
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # Proxy-Authorization, if any


def env_proxy(url: str) -> Proxy | None:
    """The proxy the environment names for a URL (`http_proxy`, `https_proxy`, `all_proxy`,
    `no_proxy`, either case), by httpx2's own rules for `trust_env`, so that a provider's chat
    requests and its SDK's requests go the same way. Credentials in the proxy's URL become its
    Proxy-Authorization header."""
    from httpx2 import URL
    from httpx2._utils import URLPattern, get_environment_proxies  # what httpx2's client mounts

    target = URL(url)
    mounts = sorted(get_environment_proxies().items(), key=lambda mount: URLPattern(mount[0]))
    named = next((proxy for pattern, proxy in mounts if URLPattern(pattern).matches(target)), None)
    if not named:
        return None
    proxy = urllib.parse.urlsplit(named if "://" in named else f"http://{named}")
    netloc = proxy.netloc.rpartition("@")[2]
    headers = {}
    if proxy.username is not None:
        pair = f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return Proxy(proxy._replace(netloc=netloc).geturl(), headers)


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
    reachable: bool | None = field(default=None, init=False)  # as last seen; None: not asked yet
    _client: Any = field(default=None, init=False, repr=False)
    _module: Any = field(default=None, init=False, repr=False)
    _session: Any = field(default=None, init=False, repr=False)  # aiohttp.ClientSession, chat requests
    _ssl: Any = field(default=None, init=False, repr=False)  # its TLS context, as the SDK's client makes it
    _proxy: Proxy | None = field(default=None, init=False, repr=False)  # from the environment, if any
    _headers: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _chat_url: str = field(default="", init=False, repr=False)
    chat_path: str = field(default="", init=False, repr=False)  # the chat endpoint, under base_url
    _building: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    _models: tuple[float, list[str], str] | None = field(default=None, init=False, repr=False)
    context_tokens: int | None = None  # the server's window as configured (CHAT_SERVERS)
    _windows: dict[str, tuple[float, int | None]] = field(default_factory=dict, init=False, repr=False)
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
        """The SDK client, built once and reused; importing the SDK and aiohttp and building a
        client (16-32 ms) happen off the event loop, so the first use never stalls other streams.
        The aiohttp session for chat requests is made beside it, on the loop (it belongs to one)."""
        if self._client is not None:
            return self._client
        async with self._building:
            if self._client is None:
                client = await anyio.to_thread.run_sync(self._build)
                self._session = self._open_session()
                self._client = client
        return self._client

    def _build(self) -> Any:
        module = importlib.import_module(self.sdk)
        importlib.import_module("aiohttp")
        self._module = module
        timeout = module.Timeout(self.timeouts.idle, connect=self.timeouts.connect)
        client = self.build_client(module, timeout)
        # The certificates the SDK's own client trusts (SSL_CERT_FILE and SSL_CERT_DIR included).
        self._ssl = sys.modules["httpx2"].create_ssl_context()
        # What the SDK sends with every request: auth, content type, user agent, API version...
        # (its X-Stainless-* telemetry describes its own request layer, which chat requests skip).
        sent = {**client.auth_headers, **client.default_headers}
        self._headers = {
            k: v for k, v in sent.items() if isinstance(v, str) and not k.lower().startswith("x-stainless-")
        }
        base = client.base_url  # joined as the SDK joins a path to it
        self._chat_url = str(base.copy_with(path=base.path.rstrip("/") + "/" + self.chat_path))
        self._proxy = env_proxy(self._chat_url)
        if self._proxy is not None and not self._chat_url.startswith("https:"):
            # A plain HTTP request through a proxy carries the proxy's credentials itself (over
            # TLS they go on the tunnel's CONNECT: `proxy_headers`).
            self._headers.update(self._proxy.headers)
        return client

    def _open_session(self) -> Any:
        """The chat requests' pool. Like the SDK's: its certificates, a connect timeout, and the idle
        timeout as the longest wait for the next bytes. The proxy from the environment is read once
        (`env_proxy`), not by aiohttp's `trust_env`, which reads it and ~/.netrc in a thread per request."""
        aiohttp = sys.modules["aiohttp"]
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTIONS, keepalive_timeout=KEEPALIVE, ssl=self._ssl),
            # `connect` also bounds the DNS lookup, a proxy's answer to CONNECT and a wait for a free
            # connection, which `sock_connect` (TCP and TLS) does not: as httpx2's connect timeout.
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.timeouts.connect,
                sock_connect=self.timeouts.connect,
                sock_read=self.timeouts.idle,
            ),
        )

    def build_client(self, module: Any, timeout: Any) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        client, session, self._client, self._session = self._client, self._session, None, None
        try:
            if client is not None:
                await client.close()
        finally:
            if session is not None:
                await session.close()

    # streaming

    async def stream(self, request: ChatRequest) -> AsyncGenerator[str | Finish]:
        """Text deltas, then one Finish. Raises ProviderError, never an SDK exception.

        A connection failure or a 5xx is tried once more, but only while nothing has been yielded:
        a retry never repeats text the client has already seen. A stream the upstream accepted and
        then cut before the first token is asked once more without streaming, which says why
        (llama-cpp-python cuts the stream of a too-long history, and answers the same request
        without streaming with a 400 `context_length_exceeded`).
        """
        if not self.configured:
            raise ProviderNotConfigured(f"{self.name} is not configured: set {self.key_env_var}")
        await self.client()
        opened = False
        for attempt in (1, 2):
            yielded = False
            try:
                if opened:  # the first attempt was cut before its first token
                    async with self.post(request, stream=False) as response:
                        items = self.complete(json_object(await response.read(), self.name))
                    for item in items:
                        yield item
                    return
                async with self.post(request, stream=True) as response:
                    opened = True
                    self.reachable = True
                    chunks = reads(response.content)
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
            self.reachable = not isinstance(error, ProviderUnreachable)
            if yielded or attempt == 2 or not error.retryable:
                raise error
            how = "without streaming" if opened else "once"
            log.info("%s: %s; retrying %s", self.name, error.detail, how)
            await asyncio.sleep(RETRY_DELAY)

    @contextlib.asynccontextmanager
    async def post(self, request: ChatRequest, *, stream: bool) -> AsyncIterator[Any]:
        """The chat request, posted on the provider's aiohttp session with the SDK's headers; the
        response (an aiohttp.ClientResponse, body not read yet) while it is open. An answer that is
        not a success is raised as the ProviderError the SDK's exception for it would become.
        On the way out the connection goes back to the pool if the body was read to its end, and
        is closed otherwise (the upstream stops generating at once)."""
        body = orjson.dumps(self.body(request, stream=stream))
        if log.isEnabledFor(logging.DEBUG):  # never the body: it holds the conversation
            where = f"{self.where.rstrip('/')}/{self.chat_path}"
            log.debug("%s: POST %s, model %s, %d bytes", self.name, where, request.model, len(body))
        proxy = self._proxy
        response = await self._session.post(
            self._chat_url,
            data=body,
            headers=self._headers,
            proxy=proxy and proxy.url,
            proxy_headers=proxy and proxy.headers,
        )
        try:
            if not 200 <= response.status < 300:
                content = await response.read()
                raise self.from_response(response.status, response.headers, content, request.model)
            yield response
        finally:
            response.release()

    def body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        """The chat request in the provider's wire format."""
        raise NotImplementedError

    def complete(self, reply: dict[str, Any]) -> list[str | Finish]:
        """The text (if any) and the Finish of a whole reply (a request without streaming)."""
        raise NotImplementedError

    def from_response(
        self, status: int, headers: Mapping[str, str], content: bytes, model: str
    ) -> ProviderError:
        """An error answer to a chat request: what the upstream said, classified by its status."""
        try:
            body: object = orjson.loads(content)
        except orjson.JSONDecodeError:
            body = None
        inner = as_dict(as_dict(body).get("error"))
        codes = (inner.get("code"), inner.get("type"), error_code(body))
        message = self.redact(upstream_message(body))
        return self.from_status(status, message, model, headers, codes)

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
            self.reachable = True
        except Exception as exc:
            try:
                error = self.translate(exc, "")
            except Exception:  # not the provider's doing: logged with its traceback, listing goes on
                log.exception("%s: listing models failed unexpectedly; using the fallback list", self.name)
                error = ProviderError(f"{self.name}: unexpected error")
            self.reachable = not isinstance(error, ProviderUnreachable)
            log.info("%s: could not list models (%s); using the fallback list", self.name, error.detail)
            names, source, ttl = list(self.fallback_models), "fallback", MODELS_FAILURE_TTL
        self._models = (time.monotonic() + ttl, names, source)
        return names, source

    # context windows

    def known_context_window(self, model: str) -> tuple[bool, int | None]:
        """(known, window in tokens or None for "no limit known"), without asking anyone."""
        if self.context_tokens is not None:
            return True, self.context_tokens
        if (table := KNOWN_WINDOWS.get(self.name)) is not None:
            return True, next((tokens for prefix, tokens in table if model.startswith(prefix)), None)
        cached = self._windows.get(model)
        if cached is None or cached[0] < time.monotonic():
            return False, None
        return True, cached[1]

    async def context_window(self, model: str) -> int | None:
        """The model's context window, asked of the server once (None when it cannot say)."""
        known, window = self.known_context_window(model)
        if known:
            return window
        try:
            window = await self.ask_context_window(model)
        except Exception as exc:
            log.info(
                "%s: could not learn the context window of %s (%s)", self.name, model, type(exc).__name__
            )
            window = None
        expires = math.inf if window is not None else time.monotonic() + WINDOW_FAILURE_TTL
        self._windows[model] = (expires, window)
        return window

    async def ask_context_window(self, model: str) -> int | None:
        return None

    def models_now(self) -> list[str]:
        """The cached listing (or the fallbacks) at once; a stale one is refreshed in the background."""
        fresh = self._models is not None and self._models[0] > time.monotonic()
        if not fresh and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self.models())
        return self._models[1] if self._models is not None else list(self.fallback_models)

    # errors

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "[redacted]") if self.api_key else text

    def translate(self, exc: Exception, model: str) -> ProviderError:
        """Map an SDK or transport exception to a ProviderError, by class (as httpx's
        map_httpcore_exceptions does): httpx2's under the SDK, aiohttp's under chat requests.
        Anything else is a bug of ours: raised as it is, so that it reaches the log with its
        traceback instead of passing for the provider's fault."""
        sdk, httpx2, aiohttp = self._module, sys.modules.get("httpx2"), sys.modules.get("aiohttp")
        if sdk is None or httpx2 is None or aiohttp is None:
            raise exc
        if isinstance(exc, sdk.APIStatusError):
            headers = exc.response.headers
            codes = (getattr(exc, "code", None), getattr(exc, "type", None), error_code(exc.body))
            message = self.redact(upstream_message(exc.body))
            return self.from_status(exc.status_code, message, model, headers, codes)
        if isinstance(exc, sdk.APIResponseValidationError):
            return ProviderMalformed(f"{self.name} sent a reply that could not be read")
        wrapper = exc if isinstance(exc, sdk.APIConnectionError) else None  # wraps a transport error
        if wrapper is not None and isinstance(wrapper.__cause__, Exception):
            exc = wrapper.__cause__
        if isinstance(exc, sdk.APITimeoutError):
            return self.timed_out()
        unreachable = (
            httpx2.ConnectTimeout,
            httpx2.ConnectError,
            aiohttp.ConnectionTimeoutError,
            aiohttp.ClientConnectorError,
            sdk.APIConnectionError,
        )
        if isinstance(exc, unreachable):
            return ProviderUnreachable(
                f"could not connect to {self.name} at {self.where}: is it running?", retryable=True
            )
        if isinstance(exc, httpx2.TimeoutException | aiohttp.ServerTimeoutError):
            return self.timed_out()
        if isinstance(exc, httpx2.TransportError | aiohttp.ClientError):
            name = type(exc).__name__
            return ProviderUnavailable(
                f"the connection to {self.name} broke off mid-reply ({name}); try again", retryable=True
            )
        if wrapper is not None:  # the SDK could not connect, for a reason of its own
            return ProviderUnreachable(f"could not connect to {self.name} at {self.where}: {wrapper}")
        raise exc

    def timed_out(self) -> ProviderTimeout:
        return ProviderTimeout(
            f"{self.name} sent nothing for {self.timeouts.idle:g} s; try again, or raise "
            f"CHAT_STREAM_IDLE_TIMEOUT for slow local models"
        )

    def from_status(
        self,
        status: int,
        message: str,
        model: str,
        headers: Mapping[str, str],
        codes: tuple[object, ...] = (),
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
            if any(isinstance(c, str) and ("spend_limit" in c or c in SPEND_LIMIT_CODES) for c in codes):
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


@dataclass(eq=False)
class OpenAICompatible(Provider):
    """OpenAI, and any server that speaks its Chat Completions API (Ollama, llama.cpp, LM Studio, vLLM)."""

    sdk: str = "openai"
    max_tokens_field: str = "max_tokens"  # OpenAI's own API wants max_completion_tokens

    sends_account_ids: bool = False  # OPENAI_ORG_ID / OPENAI_PROJECT_ID: for OpenAI's own API only

    def __post_init__(self) -> None:
        self.base_url = with_api_path(self.base_url)

    chat_path: str = field(default="chat/completions", init=False, repr=False)

    def build_client(self, module: Any, timeout: Any) -> Any:
        # Local servers need no key, but the SDK refuses to start without one (llm does the same).
        client = module.AsyncOpenAI(
            api_key=self.api_key or "no-key-needed", base_url=self.base_url, timeout=timeout, max_retries=0
        )
        if not self.sends_account_ids:  # the SDK reads them from the environment for every client
            client.organization = client.project = None
        return client

    async def ask_context_window(self, model: str) -> int | None:
        """llama.cpp's `GET /props` (the window it was started with), else Ollama's `POST /api/show`."""
        client = await self.client()
        parts = urllib.parse.urlsplit(self.base_url)
        root = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        options = {"timeout": WINDOW_TIMEOUT}
        with contextlib.suppress(Exception):
            props = await client.get(f"{root}/props", cast_to=object, options=options)
            n_ctx = props["default_generation_settings"]["n_ctx"]
            if isinstance(n_ctx, int) and n_ctx > 0:
                return n_ctx
        shown = await client.post(f"{root}/api/show", body={"model": model}, cast_to=object, options=options)
        for line in str(shown.get("parameters") or "").splitlines():  # num_ctx set in the Modelfile
            name, _, value = line.partition(" ")
            if name == "num_ctx" and value.strip().isdigit():
                return int(value.strip())
        info = shown.get("model_info") or {}
        lengths = [v for k, v in info.items() if k.endswith(".context_length") and isinstance(v, int)]
        return lengths[0] if lengths else None

    async def first_chat_model(self) -> str | None:
        """The first model this server lists that can chat; None if it lists none or did not answer."""
        names, source = await self.models()
        if source != "upstream":
            return None
        for name in names:
            if await self.can_chat(name):
                return name
        return None

    async def can_chat(self, model: str) -> bool:
        """False only where the server says so: Ollama's `/api/show` lists a model's capabilities,
        and an embedding model's leave out "completion". Other servers do not say: True."""
        client = await self.client()
        root = urllib.parse.urlsplit(self.base_url)._replace(path="", query="", fragment="")
        try:
            response = await client.post(
                f"{root.geturl()}/api/show",
                body={"model": model},
                cast_to=sys.modules["httpx2"].Response,
                options={"timeout": MODELS_TIMEOUT},
            )
        except self._module.APIError:  # no such endpoint, or it failed: the server does not say
            return True
        try:
            capabilities = as_dict(orjson.loads(response.content)).get("capabilities")
        except orjson.JSONDecodeError:
            return True
        return not isinstance(capabilities, list) or "completion" in capabilities

    def body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages += [{"role": m.role, "content": m.content} for m in request.messages]
        body: dict[str, Any] = {"model": request.model, "messages": messages, "stream": stream}
        if stream:  # the usage comes in a last chunk only when asked for
            body["stream_options"] = {"include_usage": True}
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body[self.max_tokens_field] = request.max_tokens
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    async def parse(self, events: AsyncIterator[tuple[bytes, bytes]]) -> AsyncIterator[str | Finish]:
        finish = Finish(reason=None)
        done = False
        async for _, data in events:
            if data == b"[DONE]":
                done = True
                break
            chunk = json_object(data, self.name)
            if "error" in chunk:
                raise self.from_chunk_error(chunk["error"])
            for choice in as_list(chunk.get("choices")):
                text = as_dict(as_dict(choice).get("delta")).get("content")
                if isinstance(text, str) and text:
                    yield text
                finish.reason = as_dict(choice).get("finish_reason") or finish.reason
            self.count(finish, chunk.get("usage"))
        if not done and finish.reason is None:
            raise ProviderUnavailable(
                f"{self.name} ended the stream before the reply was finished; try again", retryable=True
            )
        yield finish

    def count(self, finish: Finish, usage: object) -> None:
        if isinstance(usage, dict):
            finish.input_tokens = usage.get("prompt_tokens")
            finish.output_tokens = usage.get("completion_tokens")

    def complete(self, reply: dict[str, Any]) -> list[str | Finish]:
        choice = as_dict(as_list(reply.get("choices"))[0] if as_list(reply.get("choices")) else None)
        text = as_dict(choice.get("message")).get("content")
        finish = Finish(reason=choice.get("finish_reason"))
        self.count(finish, reply.get("usage"))
        return [text, finish] if isinstance(text, str) and text else [finish]

    def from_chunk_error(self, error: object) -> ProviderError:
        """An error event inside the stream (the HTTP status was already 200): what it says."""
        message = self.redact(upstream_message(error))
        details = as_dict(error)
        kind, code = details.get("type"), details.get("code")
        status = code if isinstance(code, int) else OPENAI_ERROR_STATUS.get(str(kind or code), 500)
        if not message:
            message = str(kind or code or "")
        return self.from_status(status, message, "", {}, (kind, code))


# the HTTP status each OpenAI-style error type comes with, for errors that arrive mid-stream
OPENAI_ERROR_STATUS = {
    "invalid_request_error": 400,
    "context_length_exceeded": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
}


def as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def with_api_path(base_url: str) -> str:
    """An OpenAI-compatible base URL with an empty or `/` path means `/v1` (Ollama's docs write
    `http://localhost:11434`; the API lives under `/v1`)."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit(parts._replace(path="/v1"))
    return base_url


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

    chat_path: str = field(default="v1/messages", init=False, repr=False)

    def build_client(self, module: Any, timeout: Any) -> Any:
        return module.AsyncAnthropic(
            api_key=self.api_key, base_url=self.base_url, timeout=timeout, max_retries=0
        )

    def body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens or self.default_max_tokens,
            "messages": alternating(request.messages),
            "stream": stream,
        }
        if request.system:
            body["system"] = request.system
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        # Sent only when set: the API version decides whether they are accepted.
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        return body

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
            event = json_object(data, self.name)
            kind = event.get("type")
            if kind == "content_block_delta":
                delta = as_dict(event.get("delta"))
                text = delta.get("text")
                if delta.get("type") == "text_delta" and isinstance(text, str) and text:
                    yield text
            elif kind == "message_start":
                self.count(finish, as_dict(event.get("message")).get("usage"))
            elif kind == "message_delta":
                finish.reason = as_dict(event.get("delta")).get("stop_reason") or finish.reason
                finish.stop_sequence = as_dict(event.get("delta")).get("stop_sequence")
                finish.output_tokens = as_dict(event.get("usage")).get("output_tokens", finish.output_tokens)
            elif kind == "message_stop":
                yield finish
                return
            elif kind == "error":
                raise self.from_event_error(as_dict(event.get("error")))
        raise ProviderUnavailable(
            f"{self.name} ended the stream before the reply was finished; try again", retryable=True
        )

    def count(self, finish: Finish, usage: object) -> None:
        if isinstance(usage, dict):
            finish.input_tokens = usage.get("input_tokens")
            finish.output_tokens = usage.get("output_tokens")

    def complete(self, reply: dict[str, Any]) -> list[str | Finish]:
        blocks = [as_dict(b) for b in as_list(reply.get("content"))]
        text = "".join(
            b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str)
        )
        finish = Finish(reason=reply.get("stop_reason"))
        self.count(finish, reply.get("usage"))
        return [text, finish] if text else [finish]

    def from_event_error(self, error: Mapping[str, Any]) -> ProviderError:
        """An `event: error` mid-stream: classify by its type (the HTTP status was already 200)."""
        kind = str(error.get("type") or "api_error")
        message = self.redact(upstream_message(error))
        return self.from_status(ANTHROPIC_ERROR_STATUS.get(kind, 500), message, "", {}, (kind,))


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
