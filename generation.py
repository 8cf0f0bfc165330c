"""Generations: every reply (and every generated title) is produced by a task of its own.

A `Generation` reads the provider's stream, keeps the text so far, checkpoints it to disk while it
runs and saves the reply when the upstream ends, whatever the clients do. Clients are subscribers:
`follow(after)` hands out the text beyond a client's offset (in code points), so a slow client gets
larger pieces later and never holds the generation back; the only text kept is the reply itself.

`Generations` is the registry of the ones running in this process, by message id: it serves
re-attach, stop, `status: "generating"` in GET, and shutdown. It is also the one place where a
generation is admitted (`admit`, before anything is written), started (`start`) and ended
(`_ended`, after its save): the hooks for rate limits, budgets and the usage ledger.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import anyio

import storage
from providers import ChatRequest, Finish, Provider, ProviderError
from storage import Message, StorageError, Store, new_id
from usage import Usage
from web import APIError

log = logging.getLogger("chat.generation")

CHECKPOINT_SECONDS = 2.0  # a kill -9 loses at most this much of a reply's text
KEEPALIVE_SECONDS = 15.0

StopReason = Literal["stopped", "disconnected", "shutdown"]


class ServerShuttingDown(APIError):
    status_code = 503
    type = "server_shutdown"


@dataclass(eq=False)
class Generation:
    """One reply being produced: its text so far, how it ended, and the reply as saved."""

    store: Store
    conversation_id: str
    reply: Message  # the placeholder as saved before the provider was called
    provider: Provider
    request: ChatRequest
    checkpoint_seconds: float | None = CHECKPOINT_SECONDS
    parts: list[str] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # ends[i]: code points up to and including parts[i]
    finish: Finish | None = None
    error: ProviderError | None = None
    stop_reason: StopReason | None = None
    final: Message | None = None  # the reply as saved (or as it could not be saved), once ended
    save_error: StorageError | None = None
    checkpoints: int = 0
    usage: Usage | None = None  # set by Generations.start: where the generation is counted
    task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    _saving: bool = False

    @property
    def id(self) -> str:
        return self.reply["id"]

    @property
    def length(self) -> int:
        return self.ends[-1] if self.ends else 0

    @property
    def ended(self) -> bool:
        return self.final is not None

    def text(self, after: int = 0) -> str:
        """The text from code point `after` to the end of what has arrived."""
        first = bisect.bisect_right(self.ends, after)
        if first >= len(self.parts):
            return ""
        start = self.ends[first] - len(self.parts[first])
        return self.parts[first][after - start :] + "".join(self.parts[first + 1 :])

    def stop(self, reason: StopReason) -> None:
        """End the reply now (the upstream is closed); it is saved as `incomplete`. Idempotent."""
        if self.stop_reason is None and not self._saving:
            self.stop_reason = reason
            self._scope.cancel()

    async def wait(self) -> Message:
        """The reply as saved, once the generation has ended."""
        while self.final is None:
            await self._changed.wait()
        return self.final

    async def follow(self, after: int = 0) -> AsyncIterator[tuple[int, str] | None]:
        """(offset after the piece, piece) for the text beyond `after` until the end; None: keep-alive."""
        offset = after
        while True:
            changed = self._changed
            if self.length > offset:
                piece, offset = self.text(offset), self.length
                yield offset, piece
                continue
            if self.ended:
                return
            try:
                async with asyncio.timeout(KEEPALIVE_SECONDS):
                    await changed.wait()
            except TimeoutError:
                yield None

    # the task

    async def run(self) -> None:
        checkpoints = asyncio.create_task(self._checkpoint_loop())
        try:
            with self._scope:
                await self._read_stream()
        finally:
            self._saving = True
            checkpoints.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait([checkpoints])
                await self._save_final()

    async def _read_stream(self) -> None:
        try:
            async for item in self.provider.stream(self.request):
                if isinstance(item, str):
                    self._append(item)
                    if len(self.parts) == 1:
                        # let the followers send the first delta before the rest of this read is
                        # parsed (a read can hold hundreds of events: BENCHMARKS.md, "first-yield")
                        await asyncio.sleep(0)
                else:
                    self.finish = item
        except ProviderError as exc:
            self.error = exc
        except Exception:
            log.exception("unexpected error while streaming from %s", self.provider.name)
            self.error = ProviderError(f"unexpected error while streaming from {self.provider.name}")

    def _append(self, text: str) -> None:
        self.parts.append(text)
        self.ends.append(self.length + len(text))
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _checkpoint_loop(self) -> None:
        """Every few seconds, the text so far goes to disk (still `incomplete`)."""
        if self.checkpoint_seconds is None:
            return
        saved = 0
        while True:
            await asyncio.sleep(self.checkpoint_seconds)
            if self.length > saved:
                saved = self.length
                try:
                    await self.save(self.snapshot(), final=False)
                    self.checkpoints += 1
                except StorageError as exc:  # the final save will try again
                    log.warning("checkpoint of reply %s failed: %s", self.id, exc.detail)

    async def _save_final(self) -> None:
        final = self.snapshot()
        try:
            await self._account(final)
        except Exception:  # the reply is the user's: counting it must never stop its save
            log.exception("could not count reply %s in the usage ledger", self.id)
        try:
            await self.save(final, final=True)
        except StorageError as exc:
            self.save_error = exc
            log.error("the reply in conversation %s was not saved: %s", self.conversation_id, exc.detail)
        self.final = final
        self._notify()

    async def _account(self, final: Message) -> None:
        """Count the generation in the usage ledger (unless it failed before any text) and put its
        tokens and cost on the reply; tokens the provider did not report are estimated."""
        if self.usage is None or (self.error is not None and not final["content"]):
            return
        entry = await self.usage.record_reply(
            self.provider.name, self.request, final["content"], self.finish, self.conversation_id
        )
        counted: storage.Usage = {"input_tokens": entry.input_tokens, "output_tokens": entry.output_tokens}
        if entry.estimated:
            counted["estimated"] = True
        final["usage"] = counted
        final["cost"] = entry.cost

    def snapshot(self) -> Message:
        """The reply as it stands: `incomplete` while running, then complete, error or incomplete."""
        reply: Message = {**self.reply, "content": self.text()}
        if self.finish is not None and self.stop_reason is None:
            reply["status"] = "complete"
            reply["finish_reason"] = self.finish.reason
            reply["usage"] = {
                "input_tokens": self.finish.input_tokens,
                "output_tokens": self.finish.output_tokens,
            }
        elif self.error is not None:
            reply["status"] = "error"
            reply["error"] = {"type": self.error.type, "message": self.error.detail}
        elif self.stop_reason is not None:  # ended on purpose: say why (a crash leaves null)
            reply["finish_reason"] = self.stop_reason
        return reply

    async def save(self, reply: Message, *, final: bool) -> None:
        """Write the reply in place of its placeholder (a title generation saves a title instead)."""
        await self.store.finish_reply(self.conversation_id, reply)


@dataclass
class Generations:
    """The generations running in this process, by message id."""

    usage: Usage | None = None
    running: dict[str, Generation] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    admitted: int = 0  # turns between `admit` and `release`: counted against the concurrency limit

    def admit(self, client: str) -> None:
        """Before anything of a new turn is written: may a generation start for `client` (the token
        or the peer address)? Refuses during shutdown, and over the rate and concurrency limits.
        An admitted turn holds its place until `release`, so a burst cannot slip past the limit."""
        if self.stopping.is_set():
            raise ServerShuttingDown("the server is shutting down; send the message again shortly")
        if self.usage is not None:
            self.usage.admit(client, running=len(self.running) + self.admitted)
        self.admitted += 1

    def release(self) -> None:
        """The admitted turn has started its generation (now in `running`) or was refused."""
        self.admitted -= 1

    def check_budget(self, provider: str) -> None:
        """Refuse a turn for `provider` whose budget is spent. Blocking: called in the storage write
        that would save the turn, so a refusal writes nothing."""
        if self.usage is not None:
            self.usage.check_budget(provider)

    def has_budget(self, provider: str) -> bool:
        """Whether `provider` has a budget to check at all (most have none: no thread hop then)."""
        return self.usage is not None and bool(self.usage.budgets.get(provider))

    def start(self, generation: Generation) -> Generation:
        """The one place a generation starts: registered, then run as a task of its own."""
        generation.usage = self.usage
        self.running[generation.id] = generation
        # kept referenced by the generation: the event loop holds tasks weakly
        generation.task = asyncio.create_task(self._run(generation))
        return generation

    async def _run(self, generation: Generation) -> None:
        started = time.monotonic()
        try:
            await generation.run()
        finally:
            self._ended(generation, time.monotonic() - started)

    def _ended(self, generation: Generation, seconds: float) -> None:
        """The one place a generation ends, after its save (and its line in the usage ledger)."""
        self.running.pop(generation.id, None)
        reply = generation.final or generation.snapshot()
        usage = reply.get("usage") or {"input_tokens": None, "output_tokens": None}
        log.info(
            "generation conversation=%s message=%s model=%s status=%s chars=%d input_tokens=%s "
            "output_tokens=%s checkpoints=%d seconds=%.3f",
            generation.conversation_id,
            generation.id,
            reply.get("model"),
            reply.get("status"),
            len(reply["content"]),
            usage.get("input_tokens"),
            usage.get("output_tokens"),
            generation.checkpoints,
            seconds,
        )

    def get(self, message_id: str) -> Generation | None:
        return self.running.get(message_id)

    def stop_all(self) -> None:
        """Shutdown: refuse new generations and end the running ones at once (each saves itself)."""
        self.stopping.set()
        for generation in list(self.running.values()):
            generation.stop("shutdown")

    async def wait_saved(self, seconds: float) -> int:
        """Wait (at most `seconds`) for every running generation to be saved; returns how many ran."""
        running = list(self.running.values())
        if running:
            with anyio.move_on_after(seconds):
                for generation in running:
                    await generation.wait()
        return len(running)

    def live(self, message: Message) -> Message:
        """A message as GET shows it: a reply being generated here has its text so far."""
        generation = self.running.get(message["id"])
        if generation is None or generation.ended:
            return message
        return {**message, "content": generation.text(), "status": "generating"}  # type: ignore[typeddict-item]


@dataclass(eq=False)
class TitleGeneration(Generation):
    """A conversation's title asked of CHAT_TITLE_MODEL: no checkpoints, saved only if complete."""

    checkpoint_seconds: float | None = None

    def __post_init__(self) -> None:
        self.reply = {**self.reply, "id": f"title-{new_id()}"}

    async def save(self, reply: Message, *, final: bool) -> None:
        title = clean_title(reply["content"])
        if final and reply.get("status") == "complete" and title:
            await self.store.set_generated_title(self.conversation_id, title)


def clean_title(text: str) -> str:
    """The first line of a model's answer, without quotes or a final full stop, at most 80 characters."""
    line = next((line for line in text.strip().splitlines() if line.strip()), "")
    line = line.strip().strip("\"'*#`“”").rstrip(".").strip()
    return line if len(line) <= 80 else line[:79].rstrip() + "…"
