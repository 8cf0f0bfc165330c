"""The OpenAI Chat Completions and Anthropic Messages wire formats, translated to and from ours.

A client's request becomes an `Exchange` (a `providers.ChatRequest` plus what the answer needs);
the provider's deltas and `Finish` become that client's JSON body or server-sent events. Whatever
the provider said, finish reasons are given in the client's vocabulary, and usage is the
provider's count or, where it sent none, `tokens`' estimate. Features this service cannot honour
yet (tools, images, structured output, several choices, extended thinking) are refused by name.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field

from providers import ChatMessage, ChatRequest, Finish
from tokens import estimate_messages, estimate_tokens

Flavor = Literal["openai", "anthropic"]


class NotSupported(Exception):
    """A feature of the client's API this service does not offer yet (answered with a 400)."""

    status_code = 400
    type = "not_supported"

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} not supported by this service yet; send text chat only")
        self.detail = str(self)


@dataclass(frozen=True)
class Exchange:
    """One /v1 call, translated: the model as the client named it and what the provider is asked."""

    model: str  # provider/model
    request: ChatRequest
    stream: bool
    include_usage: bool = False  # OpenAI's stream_options.include_usage

    def prompt_tokens(self) -> int:
        return prompt_estimate(self.request)


def prompt_estimate(request: ChatRequest) -> int:
    """The input tokens of a request by `tokens`' estimate: the system prompt counts as a message."""
    texts = [m.content for m in request.messages]
    return estimate_messages([request.system, *texts] if request.system else texts)


def usage_of(exchange: Exchange, finish: Finish | None, text: str) -> tuple[int, int]:
    """(input, output) tokens: the provider's count, else the estimate."""
    finish = finish or Finish(reason=None)
    given_in, given_out = finish.input_tokens, finish.output_tokens
    prompt = given_in if given_in is not None else exchange.prompt_tokens()
    return prompt, given_out if given_out is not None else estimate_tokens(text)


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def texts_of(content: str | list[Part] | None, where: str) -> str:
    """The text of a string or of text parts; any other part is refused."""
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type != "text":
            raise NotSupported(f"{where}: content of type {part.type!r} is")
    return "".join(part.text or "" for part in content)


class Part(BaseModel):
    """A content part (OpenAI) or block (Anthropic); extra keys such as `cache_control` are ignored."""

    type: str
    text: str | None = None


# --- OpenAI Chat Completions --------------------------------------------------------------------


class OpenAIMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Part] | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIChatIn(BaseModel):
    """A Chat Completions request; unknown fields (`user`, `metadata`, `store`, ...) are ignored."""

    model: str = Field(min_length=1)
    messages: list[OpenAIMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: Any = None


OPENAI_UNSUPPORTED = {"tools": "tools (function calling) are", "functions": "functions are"}


def openai_exchange(body: OpenAIChatIn, upstream_model: str) -> Exchange:
    """The Chat Completions request as our ChatRequest; system and developer messages become `system`."""
    for name, what in OPENAI_UNSUPPORTED.items():
        if getattr(body, name):
            raise NotSupported(what)
    if body.n not in (None, 1):
        raise NotSupported("n other than 1 is")
    if body.response_format is not None and body.response_format != {"type": "text"}:
        raise NotSupported("response_format (structured output) is")
    system: list[str] = []
    messages: list[ChatMessage] = []
    for i, message in enumerate(body.messages):
        if message.role in ("tool", "function") or message.tool_calls or message.function_call:
            raise NotSupported(f"messages[{i}]: tool calls and tool results are")
        text = texts_of(message.content, f"messages[{i}]")
        if message.role in ("system", "developer"):
            system.append(text)
        else:
            messages.append(ChatMessage(message.role, text))  # type: ignore[arg-type]
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    request = ChatRequest(
        model=upstream_model,
        messages=messages,
        system="\n\n".join(system) or None,
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=stop,
    )
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return Exchange(body.model, request, bool(body.stream), include_usage)


OPENAI_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls", "function_call"})
TO_OPENAI_REASON = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
    "tool_use": "tool_calls",
}


def openai_reason(finish: Finish | None) -> str:
    reason = finish.reason if finish is not None else None
    if reason in OPENAI_REASONS:
        return reason
    return TO_OPENAI_REASON.get(reason or "", "stop")


def openai_usage(exchange: Exchange, finish: Finish | None, text: str) -> dict[str, int]:
    prompt, completion = usage_of(exchange, finish, text)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_whole(exchange: Exchange, text: str, finish: Finish | None) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": exchange.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": openai_reason(finish),
            }
        ],
        "usage": openai_usage(exchange, finish, text),
        "system_fingerprint": None,
    }


class OpenAIEvents:
    """The `chat.completion.chunk` events of one streamed answer, encoded to bytes."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.base = {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": exchange.model,
            "system_fingerprint": None,
        }
        if exchange.include_usage:
            self.base["usage"] = None  # OpenAI sends `usage: null` on every chunk but the last
        marker = "\x00"
        template = self.chunk({"content": marker}, None)
        self.prefix, _, self.suffix = template.partition(orjson.dumps(marker))

    def chunk(self, delta: dict[str, Any], reason: str | None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return b"data: " + orjson.dumps({**self.base, "choices": [choice], **extra}) + b"\n\n"

    def head(self) -> bytes:
        return self.chunk({"role": "assistant", "content": ""}, None)

    def delta(self, text: str) -> bytes:
        return self.prefix + orjson.dumps(text) + self.suffix

    def tail(self, finish: Finish | None, text: str) -> bytes:
        end = self.chunk({}, openai_reason(finish))
        if self.exchange.include_usage:
            usage = {**self.base, "choices": [], "usage": openai_usage(self.exchange, finish, text)}
            end += b"data: " + orjson.dumps(usage) + b"\n\n"
        return end + b"data: [DONE]\n\n"

    def error(self, status: int, detail: str, kind: str) -> bytes:
        return b"data: " + orjson.dumps(openai_error_body(status, detail, kind)) + b"\n\n"


OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def openai_error_body(status: int, detail: str, kind: str) -> dict[str, Any]:
    """OpenAI's error shape; `code` carries this service's error type."""
    family = "server_error" if status >= 500 else "invalid_request_error"
    error_type = OPENAI_ERROR_TYPES.get(status, family)
    return {"error": {"message": detail, "type": error_type, "param": None, "code": kind}}


# --- Anthropic Messages -------------------------------------------------------------------------


class AnthropicMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Part]


class CountTokensIn(BaseModel):
    """What Messages and count_tokens share; `metadata`, `cache_control` and the like are ignored."""

    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[Part] | None = None
    tools: list[Any] | None = None
    thinking: Mapping[str, Any] | None = None


class AnthropicMessagesIn(CountTokensIn):
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    stop_sequences: list[str] | None = None
    stream: bool | None = False


def anthropic_request(body: CountTokensIn, upstream_model: str) -> ChatRequest:
    if body.tools:
        raise NotSupported("tools (tool use) are")
    if body.thinking is not None and body.thinking.get("type") != "disabled":
        raise NotSupported("thinking (extended thinking) is")
    messages = [
        ChatMessage(m.role, texts_of(m.content, f"messages.{i}.content")) for i, m in enumerate(body.messages)
    ]
    return ChatRequest(
        model=upstream_model, messages=messages, system=texts_of(body.system, "system") or None
    )


def anthropic_exchange(body: AnthropicMessagesIn, upstream_model: str) -> Exchange:
    base = anthropic_request(body, upstream_model)
    request = ChatRequest(
        model=base.model,
        messages=base.messages,
        system=base.system,
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_tokens,
        stop=tuple(body.stop_sequences or ()),
    )
    return Exchange(body.model, request, bool(body.stream))


ANTHROPIC_REASONS = frozenset(
    {
        "end_turn",
        "max_tokens",
        "stop_sequence",
        "tool_use",
        "pause_turn",
        "refusal",
        "model_context_window_exceeded",
    }
)
TO_ANTHROPIC_REASON = {
    "stop": "end_turn",
    "length": "max_tokens",
    "content_filter": "refusal",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
}


def anthropic_reason(finish: Finish | None) -> str:
    reason = finish.reason if finish is not None else None
    if reason in ANTHROPIC_REASONS:
        return reason
    return TO_ANTHROPIC_REASON.get(reason or "", "end_turn")


def anthropic_stop(finish: Finish | None) -> dict[str, Any]:
    sequence = finish.stop_sequence if finish is not None else None
    return {"stop_reason": anthropic_reason(finish), "stop_sequence": sequence}


def anthropic_whole(exchange: Exchange, text: str, finish: Finish | None) -> dict[str, Any]:
    prompt, output = usage_of(exchange, finish, text)
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": exchange.model,
        "content": [{"type": "text", "text": text}] if text else [],
        **anthropic_stop(finish),
        "usage": {"input_tokens": prompt, "output_tokens": output},
    }


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class AnthropicEvents:
    """Anthropic's stream events for one answer, encoded to bytes: one text block at index 0."""

    prefix = (
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
    )

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def head(self) -> bytes:
        message: dict[str, Any] = {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": self.exchange.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # the provider's count comes at the end, in message_delta; this is the estimate
            "usage": {"input_tokens": self.exchange.prompt_tokens(), "output_tokens": 0},
        }
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        return (
            event("message_start", {"type": "message_start", "message": message})
            + event("content_block_start", block)
            + event("ping", {"type": "ping"})
        )

    def delta(self, text: str) -> bytes:
        return self.prefix + orjson.dumps(text) + b"}}\n\n"

    def tail(self, finish: Finish | None, text: str) -> bytes:
        prompt, output = usage_of(self.exchange, finish, text)
        usage = {"input_tokens": prompt, "output_tokens": output}
        return (
            event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + event(
                "message_delta", {"type": "message_delta", "delta": anthropic_stop(finish), "usage": usage}
            )
            + event("message_stop", {"type": "message_stop"})
        )

    def error(self, status: int, detail: str, kind: str) -> bytes:
        return event("error", anthropic_error_body(status, detail, kind))


ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, detail: str, kind: str) -> dict[str, Any]:
    """Anthropic's error shape (it has no field for this service's error type: `detail` says it all)."""
    family = "api_error" if status >= 500 else "invalid_request_error"
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, family), "message": detail}}


def error_body(flavor: Flavor, status: int, detail: str, kind: str) -> dict[str, Any]:
    if flavor == "anthropic":
        return anthropic_error_body(status, detail, kind)
    return openai_error_body(status, detail, kind)
