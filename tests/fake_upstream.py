"""A fake LLM upstream speaking the OpenAI Chat Completions and Anthropic Messages wire formats.

The real ``openai`` and ``anthropic`` SDKs talk to it over real HTTP on loopback. It is a small
HTTP/1.1 server written directly on :func:`asyncio.start_server` (standard library only, plus
``orjson`` when available) so that tests control the bytes on the wire: streaming pace, stalls,
dropped connections, mid-stream errors and malformed bodies.

Usage in tests::

    with FakeUpstream() as up:
        up.script(Reply(text="Hello there", chunks=3), Reply(status=429, headers={"retry-after": "3"}))
        client = openai.AsyncOpenAI(api_key="k", base_url=up.openai_base_url, max_retries=0)
        ...
        assert up.requests[0].body["model"] == "fake-gpt-1"

From a shell (no API keys needed)::

    python -m tests.fake_upstream --port 9999
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    def _loads(data: bytes) -> Any:
        return orjson.loads(data)

except ImportError:  # pragma: no cover - orjson is installed in the project venv

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def _loads(data: bytes) -> Any:
        return json.loads(data)


__all__ = ["FakeUpstream", "RecordedRequest", "Reply", "split_text"]

MODES = frozenset(
    {"ok", "midstream_error", "drop_before_first", "drop_mid", "stall_headers", "stall_mid", "malformed"}
)
OPENAI_MODELS = ("fake-gpt-1", "fake-gpt-2")
ANTHROPIC_MODELS = (("claude-fake-1", "Claude Fake 1"), ("claude-fake-2", "Claude Fake 2"))

_MAX_HEAD = 1 << 20
_READ_SIZE = 1 << 16
_FLUSH_TIMEOUT = 5.0


@dataclass
class Reply:
    """What the fake answers to one chat request (either format)."""

    text: str = ""
    """Reply text; empty means the echo ``f"You said: {last user message text}"``."""
    chunks: int | None = None
    """Number of deltas (as even as possible, at least one character each); None = one per word."""
    chunk_delay: float = 0.0
    """Seconds slept between streamed deltas."""
    status: int = 200
    """Non-200: answer this status with the provider's error body instead of a reply."""
    error_type: str | None = None
    """Error type in the error body; defaults by status (and provider)."""
    error_message: str = ""
    """Error message in the error body; defaults to a realistic one."""
    error_code: str | None = None
    """Anthropic: ``error.details.error_code``; OpenAI: ``error.code``."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers, e.g. ``{"retry-after": "3"}``."""
    mode: str = "ok"
    """``ok``: normal reply. ``midstream_error``: half the deltas, then the provider's error event, then a
    clean end of stream (non-streaming request: a 500 / 529 error response). ``drop_before_first``:
    headers, then the connection is closed (non-streaming: closed without a response). ``drop_mid``:
    half the deltas (or half the JSON body), then closed. ``stall_headers`` / ``stall_mid``: headers
    (and half the deltas / body), then nothing until the client goes away or the server stops.
    ``malformed``: a body that is not JSON / a ``data: {not json`` event."""
    usage: tuple[int, int] | None = None
    """(input_tokens, output_tokens); default (words in the request's messages, number of deltas)."""
    send_usage: bool = True
    """OpenAI streaming: False sends no usage chunk even when asked (as llama-cpp-python does)."""
    model_not_found: bool = False
    """Answer 404 model-not-found in the provider's format."""
    finish_reason: str | None = None
    """The finish / stop reason in the provider's vocabulary; default ``stop`` / ``end_turn``. Anthropic's
    ``stop_sequence`` names the request's first stop sequence."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown Reply.mode {self.mode!r}; expected one of {sorted(MODES)}")
        if self.chunks is not None and self.chunks < 1:
            raise ValueError("Reply.chunks must be >= 1 (or None)")


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    started_at: float
    closed_at: float | None = None
    connection: int = 0
    """Which client connection carried it (1, 2, ... in order of arrival): shows connection reuse."""


# --------------------------------------------------------------------------------------------------
# helpers

_WORD_RE = re.compile(r"\S+\s*")


def split_text(text: str, chunks: int | None = None) -> list[str]:
    """Split ``text`` into deltas whose concatenation is exactly ``text``."""
    if not text:
        return []
    if chunks is None:
        pieces: list[str] = _WORD_RE.findall(text)
        if not pieces:
            return [text]
        lead = len(text) - len(text.lstrip())
        if lead:
            pieces[0] = text[:lead] + pieces[0]
        return pieces
    n = max(1, min(chunks, len(text)))
    size, extra = divmod(len(text), n)
    out: list[str] = []
    pos = 0
    for i in range(n):
        step = size + (1 if i < extra else 0)
        out.append(text[pos : pos + step])
        pos += step
    return out


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))
    return ""


def _last_user_text(messages: Any) -> str:
    if isinstance(messages, list):
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role") == "user":
                return _content_text(msg.get("content"))
    return ""


def _count_words(body: dict[str, Any]) -> int:
    total = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if isinstance(msg, dict):
                total += len(_content_text(msg.get("content")).split())
    total += len(_content_text(body.get("system")).split())
    return total


def _reason(status: int) -> str:
    if status == 529:
        return "Overloaded"
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(payload: bytes) -> bytes:
    return b"%X\r\n%b\r\n" % (len(payload), payload)


_LAST_CHUNK = b"0\r\n\r\n"

# Anthropic error types by status.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_ANTHROPIC_MESSAGES = {
    "invalid_request_error": "Invalid request",
    "authentication_error": "invalid x-api-key",
    "billing_error": "Your credit balance is too low to access the Anthropic API.",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "Not found",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit.",
    "api_error": "Internal server error",
    "timeout_error": "Request timed out",
    "overloaded_error": "Overloaded",
}

# OpenAI (type, code, message) by status.
_OPENAI_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
    ),
    403: (
        "request_forbidden",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", None, "Not found."),
    409: ("invalid_request_error", None, "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable request."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again in 1s."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


def _anthropic_error(
    status: int, error_type: str | None = None, message: str = "", error_code: str | None = None
) -> dict[str, Any]:
    etype = (
        error_type
        or _ANTHROPIC_TYPES.get(status)
        or ("api_error" if status >= 500 else "invalid_request_error")
    )
    err: dict[str, Any] = {"type": etype, "message": message or _ANTHROPIC_MESSAGES.get(etype, "Error")}
    if error_code is not None:
        err["details"] = {"error_code": error_code}
    return {"type": "error", "error": err}


def _openai_error(
    status: int,
    error_type: str | None = None,
    message: str = "",
    error_code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    d_type, d_code, d_msg = _OPENAI_DEFAULTS.get(
        status,
        ("server_error", None, "The server had an error while processing your request. Sorry about that!")
        if status >= 500
        else ("invalid_request_error", None, "Invalid request."),
    )
    return {
        "error": {
            "message": message or d_msg,
            "type": error_type or d_type,
            "param": param,
            "code": error_code if error_code is not None else d_code,
        }
    }


def _validate_anthropic(body: dict[str, Any]) -> str | None:
    """Return Anthropic's 400 message for an invalid Messages request, or None."""
    if "model" not in body:
        return "model: Field required"
    if "max_tokens" not in body:
        return "max_tokens: Field required"
    max_tokens = body["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Input should be a valid integer greater than or equal to 1"
    if "messages" not in body:
        return "messages: Field required"
    messages = body["messages"]
    if not isinstance(messages, list):
        return "messages: Input should be a valid list"
    if not messages:
        return "messages: at least one message is required"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"messages.{i}: Input should be a valid dictionary"
        role = msg.get("role")
        if role == "system":
            return (
                'messages: Unexpected role "system". The Messages API accepts a top-level `system` '
                'parameter, not "system" as an input message role.'
            )
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if "content" not in msg:
            return f"messages.{i}.content: Field required"
        content = msg["content"]
        is_final_assistant = i == len(messages) - 1 and role == "assistant"
        if isinstance(content, str):
            if content == "":
                if is_final_assistant:
                    continue
                return "messages: text content blocks must be non-empty"
            if not content.strip():
                return "messages: text content blocks must contain non-whitespace text"
        elif isinstance(content, list):
            if not content and not is_final_assistant:
                return (
                    f"messages.{i}: all messages must have non-empty content except for the "
                    "optional final assistant message"
                )
            for j, block in enumerate(content):
                if not isinstance(block, dict) or "type" not in block:
                    return f"messages.{i}.content.{j}: Input should be a valid dictionary or object"
                if block.get("type") == "text":
                    text = block.get("text")
                    if not isinstance(text, str):
                        return f"messages.{i}.content.{j}.text: Field required"
                    if text == "":
                        return "messages: text content blocks must be non-empty"
                    if not text.strip():
                        return "messages: text content blocks must contain non-whitespace text"
        else:
            return f"messages.{i}.content: Input should be a valid string or list"
        if i == 0 and role != "user":
            return 'messages: first message must use the "user" role'
    if "system" in body and not isinstance(body["system"], (str, list)):
        return "system: Input should be a valid string or list"
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            return "temperature: Input should be a valid number"
        if not 0.0 <= temperature <= 1.0:
            return "temperature: range: 0..1"
    return None


def _validate_openai(body: dict[str, Any]) -> tuple[str, str | None, str | None] | None:
    """Return (message, param, code) for an invalid Chat Completions request, or None."""
    if "model" not in body:
        return ("you must provide a model parameter", None, None)
    if "messages" not in body:
        return ("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        return ("Invalid type for 'messages': expected an array.", "messages", "invalid_type")
    if not messages:
        return (
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            "messages",
            "empty_array",
        )
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            return (
                f"Missing required parameter: 'messages[{i}].role'.",
                f"messages[{i}].role",
                "missing_required_parameter",
            )
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            return ("Invalid type for 'temperature': expected a decimal.", "temperature", "invalid_type")
        if temperature > 2:
            return (
                "Invalid 'temperature': decimal above maximum value. "
                f"Expected a value <= 2, but got {temperature} instead.",
                "temperature",
                "decimal_above_max_value",
            )
        if temperature < 0:
            return (
                "Invalid 'temperature': decimal below minimum value. "
                f"Expected a value >= 0, but got {temperature} instead.",
                "temperature",
                "decimal_below_min_value",
            )
    return None


@dataclass
class _Plan:
    """Pre-encoded SSE events of one streamed reply."""

    head: list[bytes]
    deltas: list[bytes]
    tail: list[bytes]
    error: bytes
    malformed: bytes


class _Conn:
    """One client connection with our own read buffer (so a watcher can read while we write)."""

    __slots__ = ("buf", "current", "eof", "number", "reader", "writer")
    _numbers = itertools.count(1)

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.number = next(self._numbers)
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self.current: RecordedRequest | None = None

    async def fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = await self.reader.read(_READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def wait_eof(self) -> None:
        while await self.fill():
            pass

    async def read_until(self, sep: bytes, limit: int) -> bytes | None:
        start = 0
        while True:
            idx = self.buf.find(sep, start)
            if idx >= 0:
                end = idx + len(sep)
                data = bytes(self.buf[:end])
                del self.buf[:end]
                return data
            if len(self.buf) > limit:
                raise ValueError("line too long")
            start = max(0, len(self.buf) - len(sep) + 1)
            if not await self.fill():
                return None

    async def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not await self.fill():
                return None
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_chunked(self) -> bytes | None:
        out = bytearray()
        while True:
            line = await self.read_until(b"\r\n", 4096)
            if line is None:
                return None
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers up to the empty line
                    trailer = await self.read_until(b"\r\n", _MAX_HEAD)
                    if trailer is None:
                        return None
                    if trailer == b"\r\n":
                        return bytes(out)
            data = await self.read_exact(size + 2)
            if data is None:
                return None
            out += data[:-2]

    @property
    def gone(self) -> bool:
        return self.eof or self.writer.transport.is_closing()


# --------------------------------------------------------------------------------------------------
# server


class FakeUpstream:
    """Fake OpenAI + Anthropic upstream running on its own event loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.api_keys: set[str] | None = None
        self.models_status: int = 200
        self.context_window: int | None = None
        """llama.cpp: ``GET /props`` reports this ``n_ctx``, and a chat request whose text is longer
        (estimated at 3 characters a token, stricter than the service's 4) is refused with 400
        ``context_length_exceeded``. None: ``/props`` is 404 and any length is served."""
        self.ollama_context: int | None = None
        """Ollama: ``POST /api/show`` reports this ``context_length`` (None: 404)."""
        self.probes: list[RecordedRequest] = []
        """Requests for ``/props`` and ``/api/show``: kept apart from ``requests`` (chat traffic)."""
        self.openai_models: tuple[str, ...] = OPENAI_MODELS
        """What ``GET /v1/models`` lists (OpenAI format)."""
        self.capabilities: dict[str, list[str]] | None = None
        """Ollama's ``POST /api/show`` answers ``{"capabilities": [...]}`` for these models (404 for
        others); None: no such endpoint (404), as on servers that are not Ollama."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[Reply] = deque()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._conns: dict[_Conn, asyncio.Task[Any]] = {}
        self._bound_port: int | None = None

    # ---- public API -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._bound_port is None:
            raise RuntimeError("FakeUpstream is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._bound_port}"

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.base_url

    def script(self, *replies: Reply) -> None:
        """Queue replies consumed FIFO by the next chat requests (either format)."""
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        """Clear the reply queue and the recorded requests."""
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.probes.clear()
            self.openai_models = OPENAI_MODELS
            self.capabilities = None
        self.context_window = None
        self.ollama_context = None

    def wait_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until ``count`` chat requests have arrived (True), or ``timeout`` has passed (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def wait_closed(self, index: int, timeout: float = 5.0) -> float | None:
        """Wait until ``requests[index].closed_at`` is set and return it (None on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                try:
                    closed = self.requests[index].closed_at
                except IndexError:
                    closed = None
                if closed is not None:
                    return closed
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def start(self) -> FakeUpstream:
        if self._thread is not None:
            raise RuntimeError("FakeUpstream already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name="fake-upstream", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if not loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):  # best effort; the loop is stopped below anyway
                fut.result(timeout=5.0)
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
        self._thread = None
        self._loop = None
        self._server = None
        self._bound_port = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- loop / thread --------------------------------------------------------------------------

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            server = loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port))
        except BaseException as exc:  # reported to start()
            failure.append(exc)
            loop.close()
            ready.set()
            return
        self._server = server
        self._bound_port = int(server.sockets[0].getsockname()[1])
        ready.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = []
        for conn, task in list(self._conns.items()):
            conn.writer.transport.abort()
            task.cancel()
            tasks.append(task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- bookkeeping ----------------------------------------------------------------------------

    def _record(self, rec: RecordedRequest) -> None:
        with self._cond:
            self.requests.append(rec)
            self._cond.notify_all()

    def _mark_closed(self, rec: RecordedRequest | None) -> None:
        if rec is None or rec.closed_at is not None:
            return
        with self._cond:
            rec.closed_at = time.monotonic()
            self._cond.notify_all()

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._queue.popleft() if self._queue else Reply()

    # ---- connection handling --------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._conns[conn] = task
        try:
            while await self._serve_one(conn):
                pass
        except (ConnectionError, OSError, ValueError):
            pass
        except asyncio.CancelledError:
            # stop() cancels us. Python 3.11's start_server calls task.exception() on this task when
            # it is done, which raises (and logs) for a cancelled task: end normally instead.
            pass
        finally:
            self._mark_closed(conn.current)
            self._conns.pop(conn, None)
            if not writer.transport.is_closing():
                writer.close()

    async def _serve_one(self, conn: _Conn) -> bool:
        """Serve one request; return True to keep the connection for the next one."""
        head = await conn.read_until(b"\r\n\r\n", _MAX_HEAD)
        if head is None:
            return False
        started = time.monotonic()
        lines = head[:-4].decode("latin-1").lstrip("\r\n").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._write_json(conn, 400, {"error": "bad request line"}, [], keep_alive=False)
            return False
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            key, value = name.strip().lower(), value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value

        if "chunked" in headers.get("transfer-encoding", "").lower():
            raw = await conn.read_chunked()
        else:
            raw = await conn.read_exact(int(headers.get("content-length", "0") or "0"))
        if raw is None:
            return False

        body: Any = None
        if raw:
            try:
                body = _loads(raw)
            except ValueError:
                body = None
        conn_header = headers.get("connection", "").lower()
        keep_alive = version == "HTTP/1.1" and "close" not in conn_header
        if version == "HTTP/1.0" and "keep-alive" in conn_header:
            keep_alive = True

        rec = RecordedRequest(method, target.split("?", 1)[0], headers, body, started, connection=conn.number)
        if rec.path in ("/props", "/api/show"):
            self.probes.append(rec)
            return await self._probe(conn, rec, keep_alive)
        self._record(rec)
        conn.current = rec
        try:
            keep = await self._dispatch(conn, rec, raw, keep_alive)
        finally:
            self._mark_closed(rec)
            conn.current = None
        return keep and keep_alive and not conn.gone

    async def _dispatch(self, conn: _Conn, rec: RecordedRequest, raw: bytes, keep_alive: bool) -> bool:
        anthropic = rec.path.startswith("/v1/messages") or "anthropic-version" in rec.headers
        route = (rec.method, rec.path)
        known = route in {
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/messages"),
            ("POST", "/v1/messages/count_tokens"),
            ("GET", "/v1/models"),
        }
        if not known:
            msg = f"Unknown request URL: {rec.method} {rec.path}."
            err = (
                _anthropic_error(404, message=msg)
                if anthropic
                else _openai_error(404, message=msg, error_code="unknown_url")
            )
            return await self._write_json(conn, 404, err, self._id_headers(anthropic), keep_alive)

        if self.api_keys is not None:
            key = rec.headers.get("x-api-key")
            if key is None:
                auth = rec.headers.get("authorization", "")
                key = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            if key is None or key not in self.api_keys:
                if anthropic:
                    err = _anthropic_error(401, message="invalid x-api-key")
                else:
                    shown = f"{key[:3]}***{key[-4:]}" if key and len(key) > 8 else (key or "")
                    err = _openai_error(
                        401,
                        message=(
                            "You didn't provide an API key."
                            if key is None
                            else f"Incorrect API key provided: {shown}. You can find your API key at "
                            "https://platform.openai.com/account/api-keys."
                        ),
                        error_code=None if key is None else "invalid_api_key",
                    )
                return await self._write_json(conn, 401, err, self._id_headers(anthropic), keep_alive)

        if route == ("GET", "/v1/models"):
            return await self._models(conn, anthropic, keep_alive)
        if raw and not isinstance(rec.body, dict):
            msg = "There was an error parsing the body of your request."
            err = _anthropic_error(400, message=msg) if anthropic else _openai_error(400, message=msg)
            return await self._write_json(conn, 400, err, self._id_headers(anthropic), keep_alive)
        body: dict[str, Any] = rec.body if isinstance(rec.body, dict) else {}
        if rec.path == "/v1/messages/count_tokens":
            if "missing" in str(body.get("model")):
                missing = _anthropic_error(404, "not_found_error", f"model: {body.get('model')}")
                return await self._write_json(conn, 404, missing, self._id_headers(True), keep_alive)
            counted = {"input_tokens": _count_words(body)}  # a stand-in for Anthropic's tokenizer
            return await self._write_json(conn, 200, counted, self._id_headers(True), keep_alive)
        if rec.path == "/v1/messages":
            return await self._anthropic_messages(conn, body, keep_alive)
        return await self._openai_chat(conn, body, keep_alive)

    async def _probe(self, conn: _Conn, rec: RecordedRequest, keep_alive: bool) -> bool:
        """llama.cpp's ``/props`` and Ollama's ``/api/show``: the context window, if one is set."""
        if rec.path == "/props" and self.context_window is not None:
            obj = {"default_generation_settings": {"n_ctx": self.context_window}, "total_slots": 1}
            return await self._write_json(conn, 200, obj, [], keep_alive)
        if rec.path == "/api/show" and (self.ollama_context is not None or self.capabilities is not None):
            return await self._ollama_show(conn, rec.body, keep_alive)
        return await self._write_json(conn, 404, {"error": "not found"}, [], keep_alive)

    def _too_long(self, body: dict[str, Any]) -> bytes | None:
        """An OpenAI-style 400 when the request's text exceeds ``context_window`` (3 characters a token)."""
        if self.context_window is None:
            return None
        chars = sum(len(_content_text(m.get("content"))) for m in body.get("messages") or ())
        asked = chars // 3 + int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
        if asked <= self.context_window:
            return None
        message = f"the request exceeds the available context size ({asked} tokens > {self.context_window})"
        return _dumps(_openai_error(400, message=message, error_code="context_length_exceeded"))

    def _id_headers(self, anthropic: bool) -> list[tuple[str, str]]:
        n = next(self._ids)
        if anthropic:
            return [("request-id", f"req_fake{n:016d}")]
        return [("x-request-id", f"req_fake{n:016x}")]

    async def _models(self, conn: _Conn, anthropic: bool, keep_alive: bool) -> bool:
        status = self.models_status
        obj: dict[str, Any]
        if status != 200:
            obj = _anthropic_error(status) if anthropic else _openai_error(status)
        elif anthropic:
            data = [
                {"type": "model", "id": mid, "display_name": name, "created_at": "2026-01-01T00:00:00Z"}
                for mid, name in ANTHROPIC_MODELS
            ]
            obj = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        else:
            obj = {
                "object": "list",
                "data": [
                    {"id": mid, "object": "model", "created": 0, "owned_by": "fake"}
                    for mid in self.openai_models
                ],
            }
        return await self._write_json(conn, status, obj, self._id_headers(anthropic), keep_alive)

    async def _ollama_show(self, conn: _Conn, body: Any, keep_alive: bool) -> bool:
        """Ollama's ``/api/show``: the model's capabilities (when ``capabilities`` lists it) and its
        context window (when ``ollama_context`` is set); 404 for a model it knows nothing of."""
        model = body.get("model") if isinstance(body, dict) else None
        obj: dict[str, Any] = {"parameters": ""}
        capabilities = (self.capabilities or {}).get(str(model))
        if capabilities is not None:
            obj["capabilities"] = capabilities
        if self.ollama_context is not None:
            obj["model_info"] = {"general.architecture": "llama", "llama.context_length": self.ollama_context}
        if len(obj) == 1:
            return await self._write_json(conn, 404, {"error": f"model '{model}' not found"}, [], keep_alive)
        return await self._write_json(conn, 200, obj, [], keep_alive)

    # ---- OpenAI Chat Completions ----------------------------------------------------------------

    async def _openai_chat(self, conn: _Conn, body: dict[str, Any], keep_alive: bool) -> bool:
        ids = self._id_headers(False)
        invalid = _validate_openai(body)
        if invalid is not None:
            msg, param, code = invalid
            err = _openai_error(400, message=msg, param=param, error_code=code)
            return await self._write_json(conn, 400, err, ids, keep_alive)
        model = str(body.get("model"))
        if "missing" in model:
            return await self._openai_model_missing(conn, model, ids, keep_alive)
        if (too_long := self._too_long(body)) is not None:
            return await self._write_json(conn, 400, too_long, ids, keep_alive)
        reply = self._next_reply()
        headers = ids + list(reply.headers.items())
        if reply.model_not_found:
            return await self._openai_model_missing(conn, model, headers, keep_alive)
        if reply.status != 200:
            err = _openai_error(reply.status, reply.error_type, reply.error_message, reply.error_code)
            return await self._write_json(conn, reply.status, err, headers, keep_alive)

        text = reply.text or f"You said: {_last_user_text(body.get('messages'))}"
        pieces = split_text(text, reply.chunks)
        prompt_tokens, completion_tokens = reply.usage or (_count_words(body), len(pieces))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        cid = f"chatcmpl-fake{next(self._ids):012d}"
        created = int(time.time())

        if body.get("stream") is not True:
            if reply.mode == "midstream_error":
                err = _openai_error(
                    500, reply.error_type or "server_error", reply.error_message, reply.error_code
                )
                return await self._write_json(conn, 500, err, headers, keep_alive)
            obj = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": reply.finish_reason or "stop",
                    }
                ],
                "usage": usage,
            }
            return await self._non_stream(conn, reply, _dumps(obj), headers, keep_alive)

        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        base: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            obj = dict(base, choices=choices, **extra)
            if include_usage and "usage" not in obj:
                obj["usage"] = None
            return b"data: " + _dumps(obj) + b"\n\n"

        first = event(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
        # Pre-encode the delta events from a template: only the content differs.
        marker = "\x00DELTA\x00"
        template = event(
            [{"index": 0, "delta": {"content": marker}, "logprobs": None, "finish_reason": None}]
        )
        prefix, _, suffix = template.partition(_dumps(marker))
        deltas = [prefix + _dumps(p) + suffix for p in pieces]
        tail = [
            event(
                [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reply.finish_reason or "stop"}]
            )
        ]
        if include_usage and reply.send_usage:
            tail.append(event([], usage=usage))
        tail.append(b"data: [DONE]\n\n")
        error = {
            "message": reply.error_message
            or "The server had an error while processing your request. Sorry about that!",
            "type": reply.error_type or "server_error",
            "param": None,
            "code": reply.error_code,
        }
        plan = _Plan(
            head=[first],
            deltas=deltas,
            tail=tail,
            error=b"data: " + _dumps({"error": error}) + b"\n\n",
            malformed=b"data: {not json\n\n",
        )
        return await self._stream(conn, reply, plan, headers, keep_alive)

    async def _openai_model_missing(
        self, conn: _Conn, model: str, headers: list[tuple[str, str]], keep_alive: bool
    ) -> bool:
        err = _openai_error(
            404,
            "invalid_request_error",
            f"The model `{model}` does not exist or you do not have access to it.",
            "model_not_found",
        )
        return await self._write_json(conn, 404, err, headers, keep_alive)

    # ---- Anthropic Messages ---------------------------------------------------------------------

    async def _anthropic_messages(self, conn: _Conn, body: dict[str, Any], keep_alive: bool) -> bool:
        ids = self._id_headers(True)
        invalid = _validate_anthropic(body)
        if invalid is not None:
            return await self._write_json(conn, 400, _anthropic_error(400, message=invalid), ids, keep_alive)
        model = str(body.get("model"))
        missing = _anthropic_error(404, "not_found_error", f"model: {model}")
        if "missing" in model:
            return await self._write_json(conn, 404, missing, ids, keep_alive)
        reply = self._next_reply()
        headers = ids + list(reply.headers.items())
        if reply.model_not_found:
            return await self._write_json(conn, 404, missing, headers, keep_alive)
        if reply.status != 200:
            err = _anthropic_error(reply.status, reply.error_type, reply.error_message, reply.error_code)
            return await self._write_json(conn, reply.status, err, headers, keep_alive)

        text = reply.text or f"You said: {_last_user_text(body.get('messages'))}"
        pieces = split_text(text, reply.chunks)
        input_tokens, output_tokens = reply.usage or (_count_words(body), len(pieces))
        mid = f"msg_fake{next(self._ids):016d}"
        reason = reply.finish_reason or "end_turn"
        sequences = body.get("stop_sequences") or [None]
        stop = {"stop_reason": reason, "stop_sequence": sequences[0] if reason == "stop_sequence" else None}

        if body.get("stream") is not True:
            if reply.mode == "midstream_error":
                err = _anthropic_error(529, reply.error_type, reply.error_message, reply.error_code)
                return await self._write_json(conn, 529, err, headers, keep_alive)
            obj = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                **stop,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            }
            return await self._non_stream(conn, reply, _dumps(obj), headers, keep_alive)

        def event(name: str, obj: dict[str, Any]) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"

        message: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }
        head = [
            event("message_start", {"type": "message_start", "message": message}),
            event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            event("ping", {"type": "ping"}),
        ]
        prefix = (
            b"event: content_block_delta\n"
            b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
        )
        deltas = [prefix + _dumps(p) + b"}}\n\n" for p in pieces]
        tail = [
            event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": stop,
                    "usage": {"output_tokens": output_tokens},
                },
            ),
            event("message_stop", {"type": "message_stop"}),
        ]
        error = _anthropic_error(
            529, reply.error_type or "overloaded_error", reply.error_message, reply.error_code
        )
        plan = _Plan(
            head=head,
            deltas=deltas,
            tail=tail,
            error=event("error", error),
            malformed=b"event: message_start\ndata: {not json\n\n",
        )
        return await self._stream(conn, reply, plan, headers, keep_alive)

    # ---- writing --------------------------------------------------------------------------------

    async def _write_json(
        self, conn: _Conn, status: int, obj: Any, headers: list[tuple[str, str]], keep_alive: bool
    ) -> bool:
        payload = obj if isinstance(obj, bytes) else _dumps(obj)
        hdrs = [("content-type", "application/json"), ("content-length", str(len(payload))), *headers]
        if not keep_alive:
            hdrs.append(("connection", "close"))
        conn.writer.write(_head(status, hdrs) + payload)
        await conn.writer.drain()
        return keep_alive

    async def _flush(self, conn: _Conn) -> None:
        """Wait until everything written so far has been handed to the kernel."""
        transport = conn.writer.transport
        await conn.writer.drain()
        deadline = time.monotonic() + _FLUSH_TIMEOUT
        while (
            transport.get_write_buffer_size() and not transport.is_closing() and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.001)

    async def _drop(self, conn: _Conn) -> bool:
        """Close the connection abruptly (after what was written so far has been sent)."""
        await self._flush(conn)
        conn.writer.transport.abort()
        self._mark_closed(conn.current)
        return False

    async def _stall(self, conn: _Conn) -> bool:
        """Send nothing more; hold the connection until the client goes away or the server stops."""
        await self._flush(conn)
        await conn.wait_eof()
        self._mark_closed(conn.current)
        conn.writer.transport.abort()
        return False

    async def _non_stream(
        self, conn: _Conn, reply: Reply, payload: bytes, headers: list[tuple[str, str]], keep_alive: bool
    ) -> bool:
        mode = reply.mode
        if mode == "drop_before_first":
            return await self._drop(conn)
        if mode == "malformed":
            payload = payload[: max(1, len(payload) // 2)]  # truncated JSON: not parseable
            return await self._write_json(conn, 200, payload, headers, keep_alive)
        if mode in ("ok", "midstream_error"):
            return await self._write_json(conn, 200, payload, headers, keep_alive)
        hdrs = [("content-type", "application/json"), ("content-length", str(len(payload))), *headers]
        conn.writer.write(_head(200, hdrs))
        if mode == "stall_headers":
            return await self._stall(conn)
        conn.writer.write(payload[: len(payload) // 2])
        if mode == "drop_mid":
            return await self._drop(conn)
        return await self._stall(conn)  # stall_mid

    async def _stream(
        self, conn: _Conn, reply: Reply, plan: _Plan, headers: list[tuple[str, str]], keep_alive: bool
    ) -> bool:
        writer = conn.writer
        mode = reply.mode
        hdrs = [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("transfer-encoding", "chunked"),
            ("cache-control", "no-cache"),
            *headers,
        ]
        if not keep_alive:
            hdrs.append(("connection", "close"))
        head = _head(200, hdrs)
        if mode == "drop_before_first":
            writer.write(head)
            return await self._drop(conn)
        if mode == "stall_headers":
            writer.write(head)
            return await self._stall(conn)
        if mode == "malformed":
            writer.write(head + _chunk(plan.malformed) + _LAST_CHUNK)
            await writer.drain()
            return keep_alive

        deltas = plan.deltas
        if mode in ("midstream_error", "drop_mid", "stall_mid"):
            deltas = deltas[: len(deltas) // 2]
        if mode == "ok":
            end = b"".join(_chunk(e) for e in plan.tail) + _LAST_CHUNK
        elif mode == "midstream_error":
            end = _chunk(plan.error) + _LAST_CHUNK
        else:
            end = b""

        delay = reply.chunk_delay
        if delay <= 0:
            writer.write(b"".join([head, *(_chunk(e) for e in plan.head), *(_chunk(d) for d in deltas), end]))
            await writer.drain()
        else:
            writer.write(b"".join([head, *(_chunk(e) for e in plan.head)]))
            await writer.drain()
            # Watch the connection while we pace the deltas so that a client going away is noticed
            # (and recorded in closed_at) at once rather than at the next write.
            watcher = asyncio.create_task(conn.wait_eof())
            try:
                for i, delta in enumerate(deltas):
                    if i:
                        done, _ = await asyncio.wait((watcher,), timeout=delay)
                        if done or conn.gone:
                            self._mark_closed(conn.current)
                            writer.transport.abort()
                            return False
                    writer.write(_chunk(delta))
                    await writer.drain()
            finally:
                if not watcher.done():
                    watcher.cancel()
                    await asyncio.wait((watcher,))  # never two readers on one StreamReader
            if end:
                writer.write(end)
                await writer.drain()

        if mode == "drop_mid":
            return await self._drop(conn)
        if mode == "stall_mid":
            return await self._stall(conn)
        return keep_alive


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fake_upstream",
        description="Fake OpenAI/Anthropic upstream that echoes 'You said: ...' (no API keys needed).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=9999, help="port to listen on (default: 9999; 0 = any free port)"
    )
    args = parser.parse_args(argv)
    upstream = FakeUpstream(args.host, args.port).start()
    print(
        f"Fake upstream listening: OpenAI base URL {upstream.openai_base_url} , "
        f"Anthropic base URL {upstream.anthropic_base_url} (any API key; Ctrl-C to stop)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
