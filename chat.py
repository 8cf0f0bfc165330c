"""A turn: save the user's message, start the reply's generation, answer the client.

Starting a turn (`begin_turn`: a message, a regenerate or an edit) validates, builds the history
the model is sent (the branch being answered, fitted into the model's context window) and saves
the user's message with a placeholder reply before any provider call. The reply itself is made by
a `generation.Generation`; the client is answered by subscribing to it, as JSON once it has ended
or as server-sent events (`EventStream`). The routes for a conversation's messages (regenerate,
edit, stop, re-attach, tree) are here too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

import storage
import tokens
from generation import Generation, Generations, TitleGeneration
from providers import ChatMessage, ChatRequest, Provider, ProviderError, ProviderTable, resolve
from schemas import ChatOut, EditIn, RegenerateIn, TreeOut
from storage import Conversation, Message, Params, StorageError, Store
from web import (
    JSON,
    APIError,
    StoreDep,
    TableDep,
    client_key,
    error,
    provider_error_response,
    until_disconnect,
)

log = logging.getLogger("chat.turn")

OnDisconnect = Literal["stop", "continue"]
SHUTDOWN = {"type": "server_shutdown", "message": "the server is shutting down; the reply so far is saved"}


class ContextTooLong(APIError):
    status_code = 400
    type = "context_too_long"


class InvalidEventId(APIError):
    status_code = 400
    type = "invalid_event_id"


@dataclass(frozen=True)
class TurnOptions:
    """What the request asked for; None means "the conversation's setting"."""

    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    history: tuple[ChatMessage, ...] | None = None  # sent instead of the stored branch (a /v1 client's own)


@dataclass
class Turn:
    """A turn whose messages are on disk; `generation` is None when its reply is not running here."""

    conversation_id: str
    user_message: Message
    reply: Message
    generation: Generation | None
    sibling_ids: list[str]

    def shown(self, reply: Message) -> dict[str, Any]:
        """A reply as the API answers it: with `sibling_ids`, as GET shows it."""
        return {**reply, "sibling_ids": self.sibling_ids}


def effective_params(conversation: Conversation, options: TurnOptions) -> Params:
    params = conversation["params"]
    return {
        "temperature": params.get("temperature") if options.temperature is None else options.temperature,
        "max_tokens": params.get("max_tokens") if options.max_tokens is None else options.max_tokens,
    }


# --- fitting the history into the model's context window ----------------------------------------


class NeedWindow(Exception):
    """Raised while building a request: the model's context window is not known yet."""

    def __init__(self, provider: Provider, model: str) -> None:
        super().__init__(model)
        self.provider, self.model = provider, model


def fit_history(
    messages: list[ChatMessage], system: str | None, window: int | None, max_tokens: int | None
) -> tuple[list[ChatMessage], int]:
    """The newest messages that fit the window with room for the reply; and how many were left out.

    Room for the reply is `max_tokens`, else a quarter of the window. The system prompt and the
    newest message always go; the history sent starts with a user message. Walks from the newest
    message back, so a long conversation costs no more than one window's worth of estimating.
    """
    if window is None:
        return messages, 0
    reserve = max_tokens if max_tokens is not None else window // 4
    fixed = tokens.estimate_messages([system]) if system else 0
    newest = tokens.estimate_messages([messages[-1].content])
    if fixed + newest + reserve > window:
        raise ContextTooLong(
            f"the message is about {newest} tokens (system prompt {fixed}, room for the reply "
            f"{reserve}), more than the model's context window of {window} tokens; shorten it, "
            f"lower max_tokens, or choose a model with a larger window"
        )
    used, start = fixed + newest + reserve, len(messages) - 1
    while start > 0:
        cost = tokens.estimate_messages([messages[start - 1].content])
        if used + cost > window:
            break
        used, start = used + cost, start - 1
    while start < len(messages) - 1 and messages[start].role != "user":
        start += 1
    return messages[start:], start


def build_request(
    conversation: Conversation,
    table: ProviderTable,
    options: TurnOptions,
    parent_id: str | None,
    user_text: str,
) -> tuple[Message, Provider, ChatRequest]:
    """The placeholder reply and the request for a user message `user_text` under `parent_id`.

    The history is that branch only; replies that failed with no text are left out.
    """
    model = options.model or conversation["model"]
    provider, upstream_model = resolve(table, model)
    known, window = provider.known_context_window(upstream_model)
    if not known:
        raise NeedWindow(provider, upstream_model)
    system = conversation["system"] if options.system is None else options.system
    params = effective_params(conversation, options)
    history = (
        list(options.history)
        if options.history is not None
        else [
            ChatMessage(m["role"], m["content"])
            for m in storage.branch_to(conversation, parent_id)
            if m["content"]
        ]
    )
    messages, left_out = fit_history(
        [*history, ChatMessage("user", user_text)], system, window, params["max_tokens"]
    )
    request = ChatRequest(
        model=upstream_model,
        messages=messages,
        system=system,
        temperature=params["temperature"],
        max_tokens=params["max_tokens"],
        top_p=options.top_p,
        stop=options.stop,
    )
    reply = storage.placeholder_reply(model, params)
    if system != conversation["system"]:
        reply["system"] = system
    if left_out:
        reply["messages_left_out"] = left_out
    return reply, provider, request


# --- starting a turn ----------------------------------------------------------------------------

Action = Literal["chat", "regenerate", "edit"]
MakeReply = Callable[[Conversation, str | None, str], Message]  # (conversation, parent id, user text)


async def begin_turn(
    store: Store,
    table: ProviderTable,
    generations: Generations,
    *,
    client: str,
    action: Action = "chat",
    conversation_id: str | None,
    message_id: str | None = None,
    text: str = "",
    options: TurnOptions,
    default_model: str,
    client_message_id: str | None = None,
) -> Turn:
    """Validate, save the user's message (and a placeholder reply), then start the generation.

    `chat` continues from the current leaf (or, without a conversation id, creates a conversation
    from the options in the same write); `regenerate` adds a reply beside `message_id` (a reply);
    `edit` adds `text` beside `message_id` (a user message). A refusal raises before anything is
    written. A `client_message_id` already in the conversation answers that earlier turn.
    """
    generations.admit(client)
    try:
        if conversation_id is None:
            resolve(table, options.model or default_model)  # refuse before a new file exists
        chosen: list[tuple[Provider, ChatRequest]] = []

        def make_reply(conversation: Conversation, parent_id: str | None, user_text: str) -> Message:
            reply, provider, request = build_request(conversation, table, options, parent_id, user_text)
            generations.check_budget(provider.name)  # inside the write: a refusal saves nothing
            chosen.append((provider, request))
            return reply

        for attempt in (1, 2):
            try:
                record = await save_turn(
                    store,
                    action,
                    conversation_id,
                    message_id,
                    text,
                    options,
                    default_model,
                    client_message_id,
                    make_reply,
                )
                break
            except NeedWindow as need:  # look the window up (once per model), then build again
                if attempt == 2:
                    raise
                await need.provider.context_window(need.model)
        if record.repeated:
            running = generations.get(record.reply["id"])
            return Turn(
                record.conversation_id, record.user_message, record.reply, running, record.sibling_ids
            )
        provider, request = chosen[-1]
        generation = generations.start(
            Generation(store, record.conversation_id, record.reply, provider, request)
        )
        return Turn(record.conversation_id, record.user_message, record.reply, generation, record.sibling_ids)
    finally:
        generations.release()  # started (now counted as running) or refused


async def save_turn(
    store: Store,
    action: Action,
    conversation_id: str | None,
    message_id: str | None,
    text: str,
    options: TurnOptions,
    default_model: str,
    client_message_id: str | None,
    make_reply: MakeReply,
) -> storage.TurnRecord:
    if action == "regenerate":
        assert conversation_id is not None and message_id is not None
        return await store.add_reply(
            conversation_id,
            message_id,
            lambda conversation, user: make_reply(conversation, user["parent_id"], user["content"]),
            client_message_id=client_message_id,
        )
    if action == "edit":
        assert conversation_id is not None and message_id is not None

        def edited(conversation: Conversation) -> Message:
            parent_id = storage.find_message(conversation, message_id)["parent_id"]
            return make_reply(conversation, parent_id, text)

        return await store.append_turn(
            conversation_id, text, edited, edit_of=message_id, client_message_id=client_message_id
        )
    target: str | Conversation
    if conversation_id is not None:
        target = conversation_id
    else:
        target = storage.new_conversation(
            model=options.model or default_model,
            system=options.system,
            params={"temperature": options.temperature, "max_tokens": options.max_tokens},
        )
    return await store.append_turn(
        target,
        text,
        lambda conversation: make_reply(conversation, conversation["current_id"], text),
        client_message_id=client_message_id,
    )


# --- answering: JSON once the reply has ended, or server-sent events as it is written --------------


def event_stream_doc(description: str) -> dict[str, Any]:
    """The OpenAPI description of a route that answers with this module's server-sent events."""
    return {
        "description": description,
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "description": "one server-sent event; `data` is JSON",
                    "properties": {
                        "event": {"enum": ["start", "delta", "done", "error"]},
                        "id": {"type": "string", "description": "code points of the reply delivered so far"},
                        "data": {"type": "string", "contentMediaType": "application/json"},
                    },
                    "required": ["event", "data"],
                }
            }
        },
    }


def sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    head = b"" if event_id is None else b"id: %d\n" % event_id
    return head + b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def error_payload(error: ProviderError | StorageError | APIError) -> dict[str, str]:
    return {"type": error.type, "message": error.detail}


def ending(turn: Turn, reply: Message) -> tuple[str, dict[str, Any]]:
    """The last event of a stream: `done`, or `error` saying why the reply ended as it did."""
    generation = turn.generation
    failure: dict[str, Any] | None = None
    if generation is not None and generation.save_error is not None:
        failure = error_payload(generation.save_error)
    elif generation is not None and generation.stop_reason == "shutdown":
        failure = SHUTDOWN
    elif reply.get("status") == "error":
        failure = dict(reply.get("error") or {"type": "provider_error", "message": "the reply failed"})
    if failure is None:
        return "done", {"message": turn.shown(reply)}
    return "error", {"error": failure, "message": turn.shown(reply)}


class EventStream(Response):
    """`text/event-stream` of one reply: `start`, `delta`s, then `done` or `error`.

    Each `delta` carries `id:` = the code points of the reply delivered up to and including it
    (`start` carries the offset the stream begins at, 0 for a new reply), so a client that comes
    back with `Last-Event-ID` misses and repeats nothing. Events are encoded here as bytes
    (FastAPI's EventSourceResponse costs ~8x more per event); the headers and the 15 s keep-alive
    match it. When the client goes away, `on_disconnect="stop"` ends the reply (saved as
    `incomplete`, upstream closed); `"continue"` lets it run on and be saved.
    """

    def __init__(self, turn: Turn, on_disconnect: OnDisconnect = "stop", after: int = 0) -> None:
        # Not Response.__init__: that would declare Content-Length: 0 for a body we stream.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.turn, self.on_disconnect, self.after = turn, on_disconnect, after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        turn, generation = self.turn, self.turn.generation

        async def body(chunk: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

        start = {
            "conversation_id": turn.conversation_id,
            "user_message_id": turn.user_message["id"],
            "message_id": turn.reply["id"],
        }
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await body(sse("start", start, self.after))
        if generation is None:
            reply = turn.reply
            if len(reply["content"]) > self.after:
                await body(sse("delta", {"text": reply["content"][self.after :]}, len(reply["content"])))
        else:
            async with until_disconnect(receive, leaving(generation, self.on_disconnect)) as watch:
                async for item in generation.follow(self.after):
                    if item is None:
                        await body(b": keep-alive\n\n")
                    else:
                        await body(sse("delta", {"text": item[1]}, item[0]))
                reply = await generation.wait()
            if watch.cancel_called:  # the client went away
                return
        name, data = ending(turn, reply)
        await body(sse(name, data), more=False)


def leaving(generation: Generation, on_disconnect: OnDisconnect) -> Callable[[], None]:
    """What a client going away does to the reply: "stop" ends it, "continue" lets it run."""

    def left() -> None:
        if on_disconnect == "stop":
            generation.stop("disconnected")

    return left


async def answer_json(turn: Turn, receive: Receive, on_disconnect: OnDisconnect) -> Response:
    """The reply once it has ended; 499 (nobody reads it) if the client went away first."""
    generation = turn.generation
    if generation is None:
        return JSON({"conversation_id": turn.conversation_id, "message": turn.shown(turn.reply)})
    async with until_disconnect(receive, leaving(generation, on_disconnect)) as watch:
        reply = await generation.wait()
    if watch.cancel_called:
        return Response(status_code=499)
    if generation.save_error is not None:
        raise generation.save_error
    extra: dict[str, Any] = {"conversation_id": turn.conversation_id, "message": turn.shown(reply)}
    if generation.stop_reason == "shutdown":
        return error(503, SHUTDOWN["message"], "server_shutdown", None, **extra)
    if generation.error is not None:
        return provider_error_response(generation.error, **extra)
    return JSON(extra)


async def answer(turn: Turn, receive: Receive, stream: bool, on_disconnect: OnDisconnect) -> Response:
    if stream:
        return EventStream(turn, on_disconnect)
    return await answer_json(turn, receive, on_disconnect)


# --- titles -------------------------------------------------------------------------------------

TITLE_PROMPT = (
    "Write a title of at most six words for a conversation that begins with the message below. "
    "Answer with the title only: no quotes, no punctuation at the end.\n\n"
)


async def title_after(
    turn: Turn, store: Store, table: ProviderTable, generations: Generations, title_model: str
) -> None:
    """After the first complete reply, ask `title_model` for a title in the background.

    Never delays a reply; a failure keeps the fallback (the first words of the first message);
    a title the user set is never replaced (the store checks, under the lock, that the title is
    still the fallback).
    """
    if turn.generation is None or turn.user_message["parent_id"] is not None:
        return
    reply = await turn.generation.wait()
    if reply.get("status") != "complete":
        return
    try:
        provider, upstream_model = resolve(table, title_model)
    except ProviderError as exc:
        log.warning("CHAT_TITLE_MODEL %s: %s", title_model, exc.detail)
        return
    request = ChatRequest(
        model=upstream_model,
        messages=[ChatMessage("user", TITLE_PROMPT + turn.user_message["content"][:4000])],
        max_tokens=32,
    )
    placeholder = storage.placeholder_reply(title_model, {"temperature": None, "max_tokens": 32})
    generations.start(TitleGeneration(store, turn.conversation_id, placeholder, provider, request))


# --- routes for a conversation's messages -------------------------------------------------------

router = APIRouter(tags=["messages"])


async def get_generations(request: Request) -> Generations:
    generations: Generations = request.app.state.generations
    return generations


GenerationsDep = Annotated[Generations, Depends(get_generations)]


def options_of(body: RegenerateIn | EditIn) -> TurnOptions:
    return TurnOptions(body.model, None, body.temperature, body.max_tokens)


async def start_and_answer(
    request: Request, turn: Turn, stream: bool, on_disconnect: OnDisconnect
) -> Response:
    state = request.app.state
    if state.title_model and turn.generation is not None and not turn.user_message["parent_id"]:
        task = asyncio.create_task(
            title_after(turn, state.store, state.providers, state.generations, state.title_model)
        )
        state.background.add(task)
        task.add_done_callback(state.background.discard)
    return await answer(turn, request.receive, stream, on_disconnect)


MESSAGE = "/api/conversations/{conversation_id}/messages/{message_id}"


@router.post(f"{MESSAGE}/regenerate", response_model=ChatOut)
async def regenerate(
    conversation_id: str,
    message_id: str,
    body: RegenerateIn,
    request: Request,
    store: StoreDep,
    table: TableDep,
    generations: GenerationsDep,
) -> Response:
    """A new reply to the same user message, beside the old one (which stays); answered as chat is."""
    return await branch(request, store, table, generations, "regenerate", conversation_id, message_id, body)


@router.post(f"{MESSAGE}/edit", response_model=ChatOut)
async def edit(
    conversation_id: str,
    message_id: str,
    body: EditIn,
    request: Request,
    store: StoreDep,
    table: TableDep,
    generations: GenerationsDep,
) -> Response:
    """A new user message beside `message_id` (same parent) and a reply to it: a new branch."""
    return await branch(request, store, table, generations, "edit", conversation_id, message_id, body)


async def branch(
    request: Request,
    store: Store,
    table: ProviderTable,
    generations: Generations,
    action: Literal["regenerate", "edit"],
    conversation_id: str,
    message_id: str,
    body: RegenerateIn,  # or EditIn, its subclass with the new text
) -> Response:
    """Regenerate or edit: a turn that starts a new branch at `message_id`, answered as chat is."""
    turn = await begin_turn(
        store,
        table,
        generations,
        client=client_key(request),
        action=action,
        conversation_id=conversation_id,
        message_id=message_id,
        text=body.message if isinstance(body, EditIn) else "",
        options=options_of(body),
        default_model=request.app.state.default_model,
        client_message_id=body.client_message_id,
    )
    return await start_and_answer(request, turn, body.stream, body.on_disconnect)


async def saved_turn(store: Store, conversation_id: str, message_id: str) -> Turn:
    """A reply as saved (and its user message), for a reply not running in this process."""
    conversation = await store.get(conversation_id)
    if not storage.is_valid_id(message_id):
        message_id = repr(message_id)[:80]
    reply = storage.find_message(conversation, message_id)
    if reply["role"] != "assistant":
        raise storage.WrongMessageRole(
            f"message {message_id} is a user message; streams and stops are of replies: send a reply's id"
        )
    user = storage.find_message(conversation, reply["parent_id"] or "")
    return Turn(conversation_id, user, reply, None, storage.sibling_ids(conversation)[user["id"]])


async def running_turn(store: Store, generations: Generations, conversation_id: str, message_id: str) -> Turn:
    generation = generations.get(message_id)
    if generation is None or generation.conversation_id != conversation_id:
        return await saved_turn(store, conversation_id, message_id)
    conversation = await store.get(conversation_id)  # also 404s a deleted conversation
    user_id = generation.reply["parent_id"] or ""
    user, siblings = storage.find_message(conversation, user_id), storage.sibling_ids(conversation)[user_id]
    return Turn(conversation_id, user, generation.reply, generation, siblings)


@router.post(f"{MESSAGE}/stop", response_model=ChatOut)
async def stop(
    conversation_id: str, message_id: str, store: StoreDep, generations: GenerationsDep
) -> Response:
    """End a reply being generated here: saved as `incomplete`, `finish_reason: "stopped"`."""
    turn = await running_turn(store, generations, conversation_id, message_id)
    if turn.generation is None:
        return JSON({"conversation_id": conversation_id, "message": turn.shown(turn.reply)})
    turn.generation.stop("stopped")
    with anyio.CancelScope(shield=True):
        reply = await turn.generation.wait()
    return JSON({"conversation_id": conversation_id, "message": turn.shown(reply)})


@router.get(
    f"{MESSAGE}/stream",
    response_model=None,
    responses={200: event_stream_doc("`text/event-stream`: start, delta..., then done or error")},
)
async def reattach(
    conversation_id: str,
    message_id: str,
    store: StoreDep,
    generations: GenerationsDep,
    after: Annotated[int, Query(ge=0, description="code points already received")] = 0,
    last_event_id: Annotated[str | None, Header(max_length=20)] = None,
) -> Response:
    """Re-attach to a reply: the text after `after` (or `Last-Event-ID`), then live deltas and the end.

    Detaching never stops the reply (on_disconnect is `continue` here).
    """
    if last_event_id is not None:
        if not last_event_id.isdigit():
            raise InvalidEventId(
                f"Last-Event-ID {last_event_id!r} is not one this service sent: echo the id of the last "
                f"event received"
            )
        after = int(last_event_id)
    turn = await running_turn(store, generations, conversation_id, message_id)
    length = turn.generation.length if turn.generation is not None else len(turn.reply["content"])
    if after > length:
        raise InvalidEventId(
            f"the reply has {length} characters so far, so {after} is past its end: echo the id of the "
            f"last event received"
        )
    return EventStream(turn, "continue", after)


@router.get("/api/conversations/{conversation_id}/tree", response_model=TreeOut, tags=["conversations"])
async def tree(conversation_id: str, store: StoreDep, generations: GenerationsDep) -> Response:
    """Every message of every branch (in the order they were added) and the current leaf."""
    conversation = await store.get(conversation_id)
    return JSON(
        {
            "id": conversation["id"],
            "current_id": conversation["current_id"],
            "messages": with_siblings(conversation, conversation["messages"], generations),
        }
    )


def with_siblings(
    conversation: Conversation, messages: list[Message], generations: Generations
) -> list[dict[str, Any]]:
    """Messages as the API shows them: live text of replies generating here, and `sibling_ids`."""
    children = storage.sibling_ids(conversation)
    return [{**generations.live(m), "sibling_ids": children[m["parent_id"]]} for m in messages]


def conversation_view(conversation: Conversation, generations: Generations) -> dict[str, Any]:
    """A conversation as GET shows it: its fields and the messages of its current branch."""
    out: dict[str, Any] = {k: v for k, v in conversation.items() if k not in ("messages", "schema_version")}
    branch = storage.current_branch(conversation)
    return {
        **out,
        **storage.summarize(conversation),
        "messages": with_siblings(conversation, branch, generations),
    }
