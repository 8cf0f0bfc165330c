"""`/v1`: the OpenAI- and Anthropic-compatible endpoints, so existing clients can use any provider here.

`POST /v1/chat/completions` speaks OpenAI's Chat Completions, `POST /v1/messages` Anthropic's
Messages; both reach the same dispatch table as `/api/chat` (`Provider.stream`: its retry and its
error translation), so an OpenAI client can talk to Claude and an Anthropic client to a local model.
Stateless: nothing is written. Errors on every `/v1` path, including the service's own refusals,
come in the client's format with the status its SDK turns into the right exception.
The translation of each format lives in `wire_formats.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import typing
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from typing import Any

import anyio
import anyio.abc
import fastapi.routing
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

import chat
import guard
from generation import Generations
from providers import (
    Finish,
    Provider,
    ProviderAuthFailed,
    ProviderError,
    ProviderSpendLimit,
    ProviderTable,
    UnknownProvider,
    resolve,
)
from storage import StorageError
from usage import LimitReached
from web import JSON, APIError, client_key, error, json_body, until_disconnect
from wire_formats import (
    AnthropicEvents,
    AnthropicMessagesIn,
    CountTokensIn,
    Exchange,
    Flavor,
    NotSupported,
    OpenAIChatIn,
    OpenAIEvents,
    anthropic_exchange,
    anthropic_request,
    anthropic_whole,
    error_body,
    openai_exchange,
    openai_whole,
    prompt_estimate,
)

PREFIX = "/v1"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
NEVER_RETRY = (ProviderSpendLimit, ProviderAuthFailed)  # waiting will not fix these
CONVERSATION_HEADER = "X-Conversation-Id"

Endpoint = Callable[..., Coroutine[Any, Any, Response]]
UTF8_BOM = b"\xef\xbb\xbf"  # a JSON text may start with one (RFC 8259 §8.1): Notepad saves it


class WireRoute(APIRoute):
    """A `/v1` route: FastAPI documents it (its body model goes into OpenAPI as for any route), and
    this handler serves it. The body is parsed and validated in one step by pydantic-core
    (`model_validate_json`) and the endpoint gets it with the request: FastAPI's own handler
    (the stdlib's json, dependency solving, a TypeAdapter) took a fifth of a `/v1` call's CPU
    (BENCHMARKS.md). Refusals are FastAPI's `RequestValidationError`, with `body` first in each
    `loc` as FastAPI gives it, so the same handler answers them.

    This handler runs no dependencies, so a route that has any (its own, its router's, or its
    inclusion's) fails when it is made, as does an endpoint that is not `async def (body,
    request)` with a pydantic model for `body`, or `async def (request)`.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Endpoint = self.endpoint
        # As APIRoute's own: an included route is served with its inclusion's dependencies.
        context = fastapi.routing._effective_route_context_var.get()
        route = context if context is not None and context.original_route is self else self
        dependencies = route.dependant.dependencies
        parameters = list(inspect.signature(endpoint).parameters)
        model = typing.get_type_hints(endpoint).get("body") if parameters == ["body", "request"] else None
        served = parameters == ["request"] or (isinstance(model, type) and issubclass(model, BaseModel))
        if dependencies or self._embed_body_fields or not served or not inspect.iscoroutinefunction(endpoint):
            raise TypeError(
                f"/v1 endpoint {endpoint.__name__} must be async, take (body: a model, request) or "
                f"(request), and have no dependencies: WireRoute runs none"
            )
        if model is None:
            return endpoint

        async def handle(request: Request) -> Response:
            try:
                raw = await request.body()
            except ClientDisconnect as exc:
                raise HTTPException(400, "the client went away while sending the body") from exc
            if not raw:
                errors: list[Any] = [{"type": "missing", "loc": ("body",), "msg": "a JSON body is required"}]
            elif not json_body(request.headers):
                given = request.headers.get("content-type")
                errors = [
                    {
                        "type": "content_type",
                        "loc": ("body",),
                        "msg": f"send the body as JSON with 'Content-Type: application/json' (got {given!r})",
                    }
                ]
            else:
                try:
                    body = model.model_validate_json(raw.removeprefix(UTF8_BOM))
                except ValidationError as exc:
                    errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
                else:
                    return await endpoint(body, request)
            raise RequestValidationError(errors, body=raw)

        return handle


router = APIRouter(prefix=PREFIX, tags=["compatible (/v1)"], route_class=WireRoute)


# --- errors in the client's own format ----------------------------------------------------------


def serves(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def flavor_of(path: str, headers: Mapping[str, str]) -> Flavor:
    """Anthropic's format for its paths and for any request carrying `anthropic-version`, else OpenAI's."""
    anthropic = path.startswith(PREFIX + "/messages") or "anthropic-version" in headers
    return "anthropic" if anthropic else "openai"


def wire_error(
    flavor: Flavor, status: int, detail: str, kind: str, headers: Mapping[str, str] | None = None
) -> JSON:
    status = 400 if status == 422 else status  # both SDKs raise BadRequestError for a 400, as the APIs send
    return JSON(error_body(flavor, status, detail, kind), status_code=status, headers=headers)


def error_for(
    path: str,
    request_headers: Mapping[str, str],
    status: int,
    detail: str,
    kind: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSON:
    """The error body for any path: the API's own, or on `/v1` the client's wire format."""
    if serves(path):
        return wire_error(flavor_of(path, request_headers), status, detail, kind, headers)
    return error(status, detail, kind, headers, **extra)


def render_refusal(scope: Scope, refusal: guard.Refusal) -> Response:
    """Guard's refusals: on `/v1` in the client's wire format, elsewhere as the API's own."""
    if not serves(scope["path"]):
        return guard.render_refusal(scope, refusal)
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
    flavor = flavor_of(scope["path"], headers)
    return wire_error(flavor, refusal.status, refusal.detail, refusal.type, refusal.headers)


def validation_detail(errors: list[Any]) -> str:
    """Pydantic's errors as one sentence a client's exception message can carry."""
    said = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        said.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request: " + "; ".join(said)


def refusal(
    flavor: Flavor, exc: ProviderError | NotSupported | StorageError, extra: Mapping[str, str] | None = None
) -> JSON:
    """A provider error or a refused feature, with the status and headers the client's SDK acts on."""
    status = 404 if isinstance(exc, UnknownProvider) else exc.status_code  # the SDKs' NotFoundError
    headers = dict(extra or {})
    if isinstance(exc, ProviderError) and exc.retry_after is not None:
        headers["Retry-After"] = exc.retry_after
    if isinstance(exc, NEVER_RETRY):
        headers["x-should-retry"] = "false"
    return wire_error(flavor, status, exc.detail, exc.type, headers)


# --- answering: the provider's stream, watched for the client going away ------------------------


Items = AsyncGenerator[str | Finish]


class Relay(Response):
    """One exchange answered whole or as events; a client that goes away closes the upstream at once.

    `items` is the provider's stream (`Provider.stream`), or a conversation turn's (`turn_items`).
    """

    def __init__(
        self, items: Items, exchange: Exchange, flavor: Flavor, headers: Mapping[str, str] | None = None
    ) -> None:
        # Not Response.__init__: the status and headers are known only once the provider has answered.
        self.background = None
        self.source = items
        self.exchange = exchange
        self.flavor = flavor
        self.extra = dict(headers or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A client that goes away cancels the read from the provider, which closes its connection.
        async with until_disconnect(receive):
            if self.exchange.stream:
                async with anyio.create_task_group() as group:
                    await self.stream(scope, receive, send, group)
            else:
                await self.whole(scope, receive, send)

    def items(self) -> contextlib.aclosing[Items]:
        return contextlib.aclosing(self.source)

    async def whole(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts: list[str] = []
        finish: Finish | None = None
        try:
            async with self.items() as items:
                async for item in items:
                    if isinstance(item, str):
                        parts.append(item)
                    else:
                        finish = item
        except ProviderError as exc:
            response: Response = refusal(self.flavor, exc, self.extra)
        else:
            encode = anthropic_whole if self.flavor == "anthropic" else openai_whole
            response = JSON(encode(self.exchange, "".join(parts), finish), headers=self.extra)
        await response(scope, receive, send)

    async def stream(self, scope: Scope, receive: Receive, send: Send, group: anyio.abc.TaskGroup) -> None:
        events = AnthropicEvents(self.exchange) if self.flavor == "anthropic" else OpenAIEvents(self.exchange)
        inbox = Inbox()
        group.start_soon(self.pump, inbox)
        batch = await inbox.take()
        if isinstance(batch[0], ProviderError):  # before the first token: an HTTP error the SDKs map
            await refusal(self.flavor, batch[0], self.extra)(scope, receive, send)
            return
        headers = SSE_HEADERS + [(k.lower().encode(), v.encode()) for k, v in self.extra.items()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        parts: list[str] = []
        body = [events.head()]
        while True:
            for item in batch:
                if isinstance(item, str):
                    parts.append(item)
                    body.append(events.delta(item))
                elif isinstance(item, Finish):
                    body.append(events.tail(item, "".join(parts)))
                else:
                    body.append(events.error(item.status_code, item.detail, item.type))
            ended = not isinstance(batch[-1], str)
            await send({"type": "http.response.body", "body": b"".join(body), "more_body": not ended})
            if ended:
                return
            body.clear()
            batch = await inbox.take()

    async def pump(self, inbox: Inbox) -> None:
        """Read the provider's stream into the inbox; deltas parsed from one read go out in one write."""
        try:
            async with self.items() as items:
                async for item in items:
                    inbox.put(item)
        except ProviderError as exc:
            inbox.put(exc)


class Inbox:
    """What the provider sent since the relay last looked: cheaper than a queue item by item."""

    def __init__(self) -> None:
        self.items: list[str | Finish | ProviderError] = []
        self.ready = asyncio.Event()

    def put(self, item: str | Finish | ProviderError) -> None:
        self.items.append(item)
        self.ready.set()

    async def take(self) -> list[str | Finish | ProviderError]:
        await self.ready.wait()
        self.ready.clear()
        taken, self.items = self.items, []
        return taken


# --- X-Conversation-Id: the exchange kept in a conversation, through chat.py's turn API ----------


async def remember(request: Request, exchange: Exchange, conversation: str) -> tuple[Items, str]:
    """Append the newest user message (and, once it ends, the reply) to a conversation, or to a new
    one for `new`; the history the client resends is not stored again, but is what the model sees."""
    sent = exchange.request.messages
    last = max((i for i, m in enumerate(sent) if m.role == "user"), default=None)
    if last is None:
        raise NotSupported("a conversation turn without a user message is")
    turn = await chat.begin_turn(
        request.app.state.store,
        request.app.state.providers,
        request.app.state.generations,
        client=client_key(request),
        conversation_id=None if conversation == "new" else conversation,
        text=sent[last].content,
        options=chat.TurnOptions(
            exchange.model,
            exchange.request.system,
            exchange.request.temperature,
            exchange.request.max_tokens,
            top_p=exchange.request.top_p,
            stop=exchange.request.stop,
            history=tuple(sent[:last]),
        ),
        default_model=request.app.state.default_model,
    )
    return turn_items(turn), turn.conversation_id


async def turn_items(turn: chat.Turn) -> Items:
    """A turn's generation as a provider stream; closing it early stops the reply (saved `incomplete`)."""
    generation = turn.generation
    if generation is None:  # a repeated turn that is no longer running here: its saved reply
        yield turn.reply["content"]
        yield Finish(reason=turn.reply.get("finish_reason"))
        return
    try:
        async for piece in generation.follow(0):
            if piece is not None:
                yield piece[1]
        await generation.wait()
    finally:
        if not generation.ended:
            generation.stop("disconnected")
    if generation.save_error is not None:
        failed = ProviderError(generation.save_error.detail)
        failed.status_code, failed.type = generation.save_error.status_code, generation.save_error.type
        raise failed
    if generation.error is not None:
        raise generation.error
    yield generation.finish or Finish(reason=None)


# --- routes -------------------------------------------------------------------------------------


def model_ids(table: ProviderTable) -> list[str]:
    return [f"{p.name}/{m}" for p in table.values() if p.configured for m in p.models_now()]


async def answer(
    request: Request, flavor: Flavor, model: str, translate: Callable[[str], Exchange]
) -> Response:
    """Resolve the model, translate the request, and relay the provider's reply (or a refusal)."""
    try:
        provider, upstream_model = resolve(request.app.state.providers, model)
        exchange = translate(upstream_model)
        conversation = request.headers.get(CONVERSATION_HEADER)
        if conversation is not None:
            items, conversation_id = await remember(request, exchange, conversation)
            return Relay(items, exchange, flavor, {CONVERSATION_HEADER: conversation_id})
        generations: Generations = request.app.state.generations
        generations.admit(client_key(request))  # rate and concurrency limits, as for /api/chat
        try:
            if generations.has_budget(provider.name):
                await anyio.to_thread.run_sync(generations.check_budget, provider.name)
        except BaseException:
            generations.release()
            raise
        return Relay(metered(provider, exchange, generations), exchange, flavor)
    except (ProviderError, NotSupported, StorageError) as exc:
        return refusal(flavor, exc)
    except (LimitReached, APIError) as exc:
        return wire_error(flavor, exc.status_code, exc.detail, exc.type, getattr(exc, "headers", None))


async def metered(provider: Provider, exchange: Exchange, generations: Generations) -> Items:
    """The provider's stream for a stateless call, holding its place among the running generations
    until it ends, then counted in the usage ledger like any reply (estimated if it ended early)."""
    texts: list[str] = []
    finish: Finish | None = None
    try:
        async for item in provider.stream(exchange.request):
            if isinstance(item, Finish):
                finish = item
            else:
                texts.append(item)
            yield item
    finally:
        generations.release()
        usage = generations.usage
        if usage is not None and (finish is not None or texts):
            with anyio.CancelScope(shield=True):
                await usage.record_reply(provider.name, exchange.request, "".join(texts), finish, None)


@router.post("/chat/completions")
async def chat_completions(body: OpenAIChatIn, request: Request) -> Response:
    """OpenAI Chat Completions (text only): whole, or streamed as `chat.completion.chunk` events."""
    return await answer(request, "openai", body.model, lambda m: openai_exchange(body, m))


@router.post("/messages")
async def messages(body: AnthropicMessagesIn, request: Request) -> Response:
    """Anthropic Messages (text only): whole, or streamed as Anthropic's events."""
    return await answer(request, "anthropic", body.model, lambda m: anthropic_exchange(body, m))


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensIn, request: Request) -> Response:
    """`{"input_tokens": n}` for a Messages request: the provider's count, else the project's estimate."""
    try:
        provider, upstream_model = resolve(request.app.state.providers, body.model)
        asked = anthropic_request(body, upstream_model)
        counted = await provider.count_tokens(asked)
    except (ProviderError, NotSupported) as exc:
        return refusal("anthropic", exc)
    return JSON({"input_tokens": prompt_estimate(asked) if counted is None else counted})


@router.get("/models")
async def list_models(request: Request) -> Response:
    """Every configured provider's models as `provider/model`, at once: the cached listing or the
    fallbacks, refreshed in the background. Anthropic's list shape with an `anthropic-version` header."""
    ids = model_ids(request.app.state.providers)
    if "anthropic-version" in request.headers:
        data = [
            {"type": "model", "id": i, "display_name": i, "created_at": "1970-01-01T00:00:00Z"} for i in ids
        ]
        first, last = (ids[0], ids[-1]) if ids else (None, None)
        return JSON({"data": data, "has_more": False, "first_id": first, "last_id": last})
    owned = [{"id": i, "object": "model", "created": 0, "owned_by": i.partition("/")[0]} for i in ids]
    return JSON({"object": "list", "data": owned})
