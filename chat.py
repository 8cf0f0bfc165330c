"""One chat turn: save the user's message, stream the provider's reply, save the reply.

This is the one place where a request, a provider stream and the disk meet, so it owns the
hard cases: a client that goes away (the upstream is closed at once and the partial reply saved
as `incomplete`), a provider that fails (the reply is saved as `error`), keep-alives during long
silences, and a save that must survive the cancellation of the task that started it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

import storage
import usage as ledger
from providers import ChatMessage, ChatRequest, Finish, Provider, ProviderError, ProviderTable, resolve
from storage import Conversation, Message, Params, StorageError, Store

log = logging.getLogger("chat.turn")

KEEPALIVE_SECONDS = 15.0
Emit = Callable[[str | None], Awaitable[None]]  # text to relay, or None for a keep-alive


class TurnTracker:
    """The turns in progress, so that shutdown can end them at once and wait until they are saved."""

    def __init__(self) -> None:
        self.unsaved: set[asyncio.Future[None]] = set()
        self.stopping = asyncio.Event()

    def stop(self) -> None:
        self.stopping.set()

    async def wait_saved(self, seconds: float) -> int:
        """Wait (at most `seconds`) for every turn's reply to be on disk; returns how many were running."""
        count = len(self.unsaved)
        if self.unsaved:
            await asyncio.wait(self.unsaved, timeout=seconds)
        return count


@dataclass(frozen=True)
class TurnOptions:
    """What the request asked for; None means "the conversation's setting"."""

    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None


def effective_params(conversation: Conversation, options: TurnOptions) -> Params:
    params = conversation["params"]
    return {
        "temperature": params.get("temperature") if options.temperature is None else options.temperature,
        "max_tokens": params.get("max_tokens") if options.max_tokens is None else options.max_tokens,
    }


@dataclass
class Turn:
    """A turn whose user message and placeholder reply are on disk; `run` streams and saves."""

    store: Store
    conversation_id: str
    user_message: Message
    reply: Message
    provider: Provider
    request: ChatRequest
    tracker: TurnTracker
    usage: ledger.Usage
    parts: list[str] = field(default_factory=list)
    finish: Finish | None = None
    error: ProviderError | None = None
    final: Message | None = None  # the reply as saved, once `run` has ended

    async def run(self, emit: Emit) -> Message:
        """Relay the reply through `emit`, then save it; the save survives cancellation.

        The turn stays in the tracker until its reply is on disk, so shutdown can wait for it.
        """
        saved = asyncio.get_running_loop().create_future()
        self.tracker.unsaved.add(saved)
        try:
            await self._relay(emit)
        finally:
            final = self.final = self._final_reply()
            save = asyncio.ensure_future(self._account_and_save(final))
            save.add_done_callback(lambda _: self._settle(saved, save, final))
            with anyio.CancelScope(shield=True):
                await asyncio.wait([save])
        save.result()  # a failed save raises StorageError here, unless the turn was cancelled
        return final

    async def _account_and_save(self, final: Message) -> None:
        """Count the generation in the usage ledger (unless it failed before any text), then save."""
        if self.error is None or final["content"]:
            reported = (self.finish.input_tokens, self.finish.output_tokens) if self.finish else None
            prompt = [m.content for m in self.request.messages]
            if self.request.system:
                prompt.append(self.request.system)
            input_tokens, output_tokens, estimated = ledger.counted_tokens(reported, prompt, final["content"])
            entry = await self.usage.record(
                provider=self.provider.name,
                model=self.request.model,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                estimated=estimated,
                conversation_id=self.conversation_id,
            )
            counted: storage.Usage = {"input_tokens": input_tokens, "output_tokens": output_tokens}
            if estimated:
                counted["estimated"] = True
            final["usage"] = counted
            final["cost"] = entry.cost
        await self.store.finish_reply(self.conversation_id, final)

    def _settle(self, saved: asyncio.Future[None], save: asyncio.Future[None], final: Message) -> None:
        """The save is over: release shutdown's wait, and say in the log what became of the reply."""
        self.tracker.unsaved.discard(saved)
        saved.set_result(None)
        failure = "cancelled" if save.cancelled() else save.exception()
        if failure is None:
            self._log(final)
        else:  # also reached when nobody awaits `save` any more (client gone, shutdown)
            log.error("the reply in conversation %s was not saved: %s", self.conversation_id, failure)

    async def _relay(self, emit: Emit) -> None:
        queue: asyncio.Queue[str | Finish | ProviderError] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(queue))
        try:
            while self.finish is None and self.error is None:
                try:
                    async with asyncio.timeout(KEEPALIVE_SECONDS):
                        item = await queue.get()
                except TimeoutError:
                    await emit(None)
                    continue
                texts = []
                while True:  # deltas that arrived together go out as one
                    if isinstance(item, str):
                        texts.append(item)
                    elif isinstance(item, Finish):
                        self.finish = item
                    else:
                        self.error = item
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if texts:
                    text = "".join(texts)
                    self.parts.append(text)
                    await emit(text)
        finally:
            pump.cancel()  # closes the upstream connection if it is still open
            with anyio.CancelScope(shield=True):
                await asyncio.wait([pump])

    async def _pump(self, queue: asyncio.Queue[str | Finish | ProviderError]) -> None:
        try:
            first = True
            async for item in self.provider.stream(self.request):
                queue.put_nowait(item)
                if first:  # relay the first delta now, not after the rest of this read is parsed
                    first = False
                    await asyncio.sleep(0)
        except ProviderError as exc:
            queue.put_nowait(exc)
        except Exception:
            log.exception("unexpected error while streaming from %s", self.provider.name)
            queue.put_nowait(ProviderError(f"unexpected error while streaming from {self.provider.name}"))

    def _final_reply(self) -> Message:
        reply: Message = {**self.reply, "content": "".join(self.parts)}
        if self.finish is not None:
            reply["status"] = "complete"
            reply["finish_reason"] = self.finish.reason
            reply["usage"] = {
                "input_tokens": self.finish.input_tokens,
                "output_tokens": self.finish.output_tokens,
            }
        elif self.error is not None:
            reply["status"] = "error"
            reply["error"] = {"type": self.error.type, "message": self.error.detail}
        return reply

    def _log(self, reply: Message) -> None:
        usage = reply.get("usage") or {"input_tokens": None, "output_tokens": None}
        log.info(
            "turn conversation=%s model=%s status=%s chars=%d input_tokens=%s output_tokens=%s",
            self.conversation_id,
            reply.get("model"),
            reply.get("status"),
            len(reply["content"]),
            usage.get("input_tokens"),
            usage.get("output_tokens"),
        )


async def begin_turn(
    store: Store,
    table: ProviderTable,
    tracker: TurnTracker,
    usage: ledger.Usage,
    *,
    conversation_id: str | None,
    text: str,
    options: TurnOptions,
    default_model: str,
) -> Turn:
    """Validate, then save the user's message (and a placeholder reply) before any provider call.

    Without a conversation id a new conversation is created from the options, in the same write.
    An unknown or unconfigured provider raises before anything is written.
    """
    if conversation_id is None:
        resolve(table, options.model or default_model)  # refuse before a new file exists
    chosen: list[tuple[Provider, ChatRequest]] = []

    def make_reply(conversation: Conversation) -> Message:
        model = options.model or conversation["model"]
        provider, upstream_model = resolve(table, model)
        usage.check_budget(provider.name)  # refused before anything is written
        system = conversation["system"] if options.system is None else options.system
        params = effective_params(conversation, options)
        history = [
            ChatMessage(m["role"], m["content"]) for m in storage.current_branch(conversation) if m["content"]
        ]
        request = ChatRequest(
            model=upstream_model,
            messages=[*history, ChatMessage("user", text)],
            system=system,
            temperature=params["temperature"],
            max_tokens=params["max_tokens"],
        )
        chosen.append((provider, request))
        reply = storage.placeholder_reply(model, params)
        if system != conversation["system"]:
            reply["system"] = system
        return reply

    target: str | Conversation
    if conversation_id is not None:
        target = conversation_id
    else:
        target = storage.new_conversation(
            model=options.model or default_model,
            system=options.system,
            params={"temperature": options.temperature, "max_tokens": options.max_tokens},
        )
    record = await store.append_turn(target, text, make_reply)
    provider, request = chosen[-1]
    return Turn(
        store=store,
        conversation_id=record.conversation_id,
        user_message=record.user_message,
        reply=record.reply,
        provider=provider,
        request=request,
        tracker=tracker,
        usage=usage,
    )


# --- the two ways a turn is answered ------------------------------------------------------------


def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def error_payload(error: ProviderError | StorageError) -> dict[str, str]:
    return {"type": error.type, "message": error.detail}


SHUTDOWN = {"type": "server_shutdown", "message": "the server is shutting down; the reply so far is saved"}


class EventStream(Response):
    """`text/event-stream` of one turn: `start`, `delta`s, then `done` or `error`.

    Events are encoded here as bytes (FastAPI's EventSourceResponse costs ~8x more per event);
    the headers and the 15 s keep-alive match it. A client disconnect cancels the relay, which
    closes the upstream stream; the partial reply is saved as `incomplete`.
    """

    def __init__(self, turn: Turn) -> None:
        # Not Response.__init__: that would declare Content-Length: 0 for a body we stream.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.turn = turn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        turn = self.turn

        async def emit(text: str | None) -> None:
            body = b": keep-alive\n\n" if text is None else sse("delta", {"text": text})
            await send({"type": "http.response.body", "body": body, "more_body": True})

        start = {
            "conversation_id": turn.conversation_id,
            "user_message_id": turn.user_message["id"],
            "message_id": turn.reply["id"],
        }
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": sse("start", start), "more_body": True})
        try:
            outcome = await run_watched(turn, receive, emit)
        except StorageError as exc:
            end = sse("error", {"error": error_payload(exc), "message": turn.final})
        else:
            if outcome == "gone":
                return
            end = sse("done", {"message": turn.final})
            if outcome == "stopped":
                end = sse("error", {"error": SHUTDOWN, "message": turn.final})
            elif turn.error is not None:
                end = sse("error", {"error": error_payload(turn.error), "message": turn.final})
        await send({"type": "http.response.body", "body": end, "more_body": False})


async def run_watched(turn: Turn, receive: Receive, emit: Emit) -> Literal["done", "gone", "stopped"]:
    """Run the turn until it ends ("done"), the client disconnects ("gone") or the server stops."""
    outcome: Literal["done", "gone", "stopped"] = "done"
    failed: list[StorageError] = []

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def watch(event: Literal["gone", "stopped"], happened: Callable[[], Awaitable[Any]]) -> None:
        nonlocal outcome
        await happened()
        if turn.final is None:  # once the reply is final, a late stop or disconnect changes nothing
            outcome = event
            group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(watch, "gone", disconnected)
        group.start_soon(watch, "stopped", turn.tracker.stopping.wait)
        try:
            await turn.run(emit)
        except StorageError as exc:  # kept out of the task group, which would wrap it in a group
            failed.append(exc)
        group.cancel_scope.cancel()
    if failed:
        raise failed[0]
    return outcome


async def ignore(_: str | None) -> None:
    """The `emit` of a turn answered as a whole."""
