"""Conversations as JSON files: one locked, atomically and durably written file per conversation.

Layout under the data directory::

    conversations/<id>.json       the conversation (always valid JSON, schema_version inside)
    conversations/<id>.json.lock  its lock file (never deleted: waiters would lock another inode)
    changes.log                   one JSON line per write: the conversation's new summary, so the
                                  listing index in every process stays fresh without a directory scan

Every write is a read-modify-write of one file under an asyncio lock (between tasks) and a file
lock (between processes), run in a worker thread so the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NotRequired, TypeVar

import anyio.to_thread
import orjson
from filelock import FileLock
from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic reads only this one on Python 3.11

SCHEMA_VERSION = 2
ID_RE = re.compile(r"[0-9a-f]{32}")
FILE_RE = re.compile(r"([0-9a-f]{32})\.json")
JOURNAL_MAX_BYTES = 4 * 1024 * 1024
STALE_TEMP_SECONDS = 60.0

log = logging.getLogger("chat.storage")

Status = Literal["complete", "incomplete", "error"]


# The stored shape, described once. Each file is checked against it when read (`SHAPE`), and the
# check's output is thrown away: the file's own dict is what the service uses and writes back, so
# keys this version does not know (added by a newer one, or by hand) are kept. A new stored field
# is NotRequired here (older files lack it) and documented in SPEC.md section 4.


class Usage(TypedDict):
    input_tokens: int | None
    output_tokens: int | None


class ErrorInfo(TypedDict):
    type: str
    message: str


class Params(TypedDict):
    temperature: float | None
    max_tokens: int | None


class Message(TypedDict):
    id: str
    parent_id: str | None
    role: Literal["user", "assistant"]
    content: str
    created_at: str
    # replies only
    model: NotRequired[str]
    system: NotRequired[str | None]
    params: NotRequired[Params]
    status: NotRequired[Status]
    finish_reason: NotRequired[str | None]
    usage: NotRequired[Usage | None]
    error: NotRequired[ErrorInfo | None]


class Conversation(TypedDict):
    schema_version: int
    id: str
    title: str | None
    created_at: str
    updated_at: str
    model: str
    system: str | None
    params: Params
    current_id: str | None
    messages: list[Message]


SHAPE: TypeAdapter[Conversation] = TypeAdapter(Conversation)


class Summary(TypedDict):
    id: str
    title: str | None
    created_at: str
    updated_at: str
    model: str
    message_count: int


SUMMARY_KEYS = frozenset(Summary.__annotations__)


# --- errors -------------------------------------------------------------------------------------


class StorageError(Exception):
    """A conversation could not be read or written; carries the HTTP status the API answers."""

    status_code = 500
    type = "storage_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ConversationNotFound(StorageError):
    status_code = 404
    type = "conversation_not_found"


class ConversationUnreadable(StorageError):
    """The file exists but is corrupt or from a newer version: reported, left untouched."""

    status_code = 409
    type = "conversation_unreadable"


class StorageFull(StorageError):
    status_code = 507
    type = "storage_full"


class InvalidCursor(StorageError):
    status_code = 400
    type = "invalid_cursor"


# --- small helpers ------------------------------------------------------------------------------


def new_id() -> str:
    return secrets.token_hex(16)


def now() -> str:
    """UTC with microseconds, e.g. 2026-11-24T05:31:52.126057Z (sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def is_valid_id(value: str) -> bool:
    return ID_RE.fullmatch(value) is not None


def title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 80 else line[:79].rstrip() + "…"


def current_branch(conversation: Conversation) -> list[Message]:
    """The messages from the first one to `current_id`, following `parent_id` links."""
    by_id = {m["id"]: m for m in conversation["messages"]}
    branch: list[Message] = []
    node = by_id.get(conversation["current_id"] or "")
    while node is not None and len(branch) <= len(by_id):
        branch.append(node)
        node = by_id.get(node["parent_id"] or "")
    branch.reverse()
    return branch


def summarize(conversation: Conversation) -> Summary:
    return {
        "id": conversation["id"],
        "title": conversation["title"],
        "created_at": conversation["created_at"],
        "updated_at": conversation["updated_at"],
        "model": conversation["model"],
        "message_count": len(conversation["messages"]),
    }


def encode_cursor(summary: Summary) -> str:
    raw = f"{summary['updated_at']}|{summary['id']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        updated_at, _, conversation_id = raw.partition("|")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        updated_at, conversation_id = "", ""
    if not is_valid_id(conversation_id):
        raise InvalidCursor("cursor is not valid: pass the next_cursor of a previous page unchanged")
    return updated_at, conversation_id


def new_conversation(
    *, model: str, system: str | None, params: Params, title: str | None = None
) -> Conversation:
    """A conversation not yet saved."""
    stamp = now()
    return {
        "schema_version": SCHEMA_VERSION,
        "id": new_id(),
        "title": title,
        "created_at": stamp,
        "updated_at": stamp,
        "model": model,
        "system": system,
        "params": params,
        "current_id": None,
        "messages": [],
    }


def placeholder_reply(model: str, params: Params) -> Message:
    """The reply saved with the user's message before the provider is called: what a crash leaves."""
    return {
        "id": new_id(),
        "parent_id": None,  # set by append_turn to the user's message
        "role": "assistant",
        "content": "",
        "created_at": now(),
        "model": model,
        "params": params,
        "status": "incomplete",
        "finish_reason": None,
        "usage": None,
        "error": None,
    }


# --- schema -------------------------------------------------------------------------------------


def _migrate_0_to_1(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 0: a hand-written or pre-release file without schema_version, ids, status or params.

    What it lacks is derived from the file itself, never made up, so that reading the same file
    twice gives the same ids and `current_id` (it is migrated on every read until it is written).
    """
    doc.setdefault("title", None)
    doc.setdefault("system", None)
    doc.setdefault("params", {"temperature": None, "max_tokens": None})
    messages = doc.setdefault("messages", [])
    previous = None
    for position, message in enumerate(messages):
        message.setdefault("id", derived_id(doc.get("id"), position, message))
        message.setdefault("parent_id", previous)
        message.setdefault("created_at", doc.get("created_at"))
        if message.get("role") == "assistant":
            message.setdefault("status", "complete")
        previous = message["id"]
    doc.setdefault("current_id", previous)
    doc["schema_version"] = 1
    return doc


def derived_id(conversation_id: object, position: int, message: dict[str, Any]) -> str:
    """An id for a message that has none: a hash of its conversation, position and content."""
    seed = orjson.dumps([conversation_id, position, message], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(seed).hexdigest()[:32]


def _migrate_1_to_2(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 2 adds only optional fields (see SPEC.md section 4): a version 1 file is one already.

    The bump tells an older service that a file may hold fields it would not understand, so it
    refuses the file instead of dropping them.
    """
    doc["schema_version"] = 2
    return doc


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _migrate_0_to_1, 1: _migrate_1_to_2}


def parse_conversation(data: bytes, conversation_id: str) -> Conversation:
    """Decode a file's bytes, migrating an older schema; refuse a corrupt, misshapen or newer file.

    The one check of a file's shape: every reader (the API, a turn, the listing) goes through it,
    and any problem is ConversationUnreadable (409), never an exception further on.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ConversationUnreadable(
            f"conversation {conversation_id} is not valid JSON ({exc}); "
            f"the file is left untouched: repair it or delete it"
        ) from None
    if not isinstance(doc, dict):
        raise ConversationUnreadable(
            f"conversation {conversation_id} is not a conversation object; repair the file or delete it"
        )
    doc = migrated(doc, conversation_id)
    try:
        SHAPE.validate_python(doc, strict=True)  # a check only: its output would drop unknown keys
    except ValidationError as exc:
        raise ConversationUnreadable(
            f"conversation {conversation_id} {shape_problem(exc)}; repair the file or delete it"
        ) from None
    if doc["id"] != conversation_id:
        raise ConversationUnreadable(
            f"conversation {conversation_id} has id {doc['id']!r} instead of its file name; "
            f"repair the file or delete it"
        )
    conversation: Conversation = doc  # type: ignore[assignment]  # checked just above
    return conversation


def migrated(doc: dict[str, Any], conversation_id: str) -> dict[str, Any]:
    """The file's dict brought to SCHEMA_VERSION, in place; refuses a newer file."""
    version = doc.get("schema_version", 0)
    if type(version) is not int or version < 0:
        raise ConversationUnreadable(
            f"conversation {conversation_id} has schema_version {version!r}, which is no version "
            f"(0 to {SCHEMA_VERSION}); repair the file or delete it"
        )
    if version > SCHEMA_VERSION:
        raise ConversationUnreadable(
            f"conversation {conversation_id} was written by a newer version (schema {version!r}, "
            f"this service reads up to {SCHEMA_VERSION}); upgrade the service to open it"
        )
    try:
        while version < SCHEMA_VERSION:
            doc = MIGRATIONS[version](doc)
            version = doc["schema_version"]
    except (AttributeError, TypeError) as exc:  # a part of the file is not the object it should be
        raise ConversationUnreadable(
            f"conversation {conversation_id} could not be upgraded from schema {version} "
            f"({type(exc).__name__}: {exc}); repair the file or delete it"
        ) from None
    return doc


def shape_problem(exc: ValidationError) -> str:
    """The first thing wrong with a file, in the file's own terms: `messages.3.role: Input should be ...`."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "the file"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"does not have the stored shape: {where}: {first['msg']}{more}"


def encode(conversation: Conversation) -> bytes:
    return orjson.dumps(conversation, option=orjson.OPT_INDENT_2)


# --- durable writes -----------------------------------------------------------------------------


def _os_error(exc: OSError, what: str, doing: str = "save") -> StorageError:
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"could not {doing} {what}: {reason}; free some disk space and retry")
    return StorageError(f"could not {doing} {what}: {reason}; check the data directory and retry")


@contextlib.contextmanager
def reading(conversation_id: str) -> Iterator[None]:
    """A read's OS errors as the API's: not found -> 404, anything else -> storage_error."""
    try:
        yield
    except FileNotFoundError:
        raise ConversationNotFound(
            f"no conversation {conversation_id}: list them with GET /api/conversations"
        ) from None
    except OSError as exc:
        raise _os_error(exc, f"conversation {conversation_id}", "read") from exc


def write_durably(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over, fsync the directory.

    A crash at any instant leaves either the old or the new file; the temp file is removed on error.
    """
    os.close(write_durably_kept(path, data))


def write_durably_kept(path: Path, data: bytes) -> int:
    """`write_durably`, returning the new file's descriptor, still open (the caller closes it)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_directory(path.parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the listing index --------------------------------------------------------------------------


class ListingIndex:
    """Summaries of every conversation, kept in memory and fresh through `changes.log`.

    Every writer (in any process) appends the new summary to the log after it replaces a file; a
    reader stats the log and applies only the lines it has not seen. A missing, truncated or
    oversized log means a full rescan, which is also how the index is first built.
    Not thread-safe: the Store calls it from one worker thread at a time.
    """

    def __init__(self, conversations: Path, journal: Path) -> None:
        self.conversations = conversations
        self.journal = journal
        self.summaries: dict[str, Summary] = {}
        self.unreadable: dict[str, str] = {}
        self._order: list[tuple[str, str]] = []  # (updated_at, id), ascending
        self._offset = -1  # -1: never scanned

    def refresh(self) -> None:
        try:
            size = os.stat(self.journal).st_size
        except FileNotFoundError:
            size = 0
        if self._offset < 0 or size < self._offset:
            self._rescan()
        elif size > JOURNAL_MAX_BYTES:
            os.truncate(self.journal, 0)
            self._rescan()
        elif size > self._offset:
            self._apply_journal(size)

    def page(self, limit: int, before: tuple[str, str] | None) -> tuple[list[Summary], str | None]:
        end = len(self._order) if before is None else bisect.bisect_left(self._order, before)
        keys = self._order[max(0, end - limit) : end][::-1]
        items = [self.summaries[key[1]] for key in keys]
        more = end - limit > 0
        return items, encode_cursor(items[-1]) if more and items else None

    def _rescan(self) -> None:
        try:
            offset = os.stat(self.journal).st_size
        except FileNotFoundError:
            offset = 0
        summaries: dict[str, Summary] = {}
        unreadable: dict[str, str] = {}
        with os.scandir(self.conversations) as entries:
            for entry in entries:
                match = FILE_RE.fullmatch(entry.name)
                if match is None:
                    continue
                conversation_id = match.group(1)
                try:
                    summaries[conversation_id] = summarize(
                        parse_conversation(Path(entry.path).read_bytes(), conversation_id)
                    )
                except FileNotFoundError:
                    continue  # deleted while we scanned
                except (StorageError, OSError) as exc:
                    unreadable[conversation_id] = str(exc)
                    log.warning("skipping unreadable conversation file %s: %s", entry.name, exc)
        # swapped in only once the scan has succeeded, so a failure leaves the index as it was
        self.summaries, self.unreadable, self._offset = summaries, unreadable, offset
        self._order = sorted((s["updated_at"], s["id"]) for s in summaries.values())
        # lines appended while scanning are applied again: harmless, they carry full summaries
        self.refresh()

    def _apply_journal(self, size: int) -> None:
        with open(self.journal, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        complete = chunk.rfind(b"\n") + 1  # a line still being appended is read next time
        for line in chunk[:complete].splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            if entry.get("deleted") or entry.keys() >= SUMMARY_KEYS:
                self._apply(entry)
        self._offset += complete

    def _apply(self, entry: dict[str, Any]) -> None:
        conversation_id = entry["id"]
        old = self.summaries.pop(conversation_id, None)
        if old is not None:
            key = (old["updated_at"], conversation_id)
            position = bisect.bisect_left(self._order, key)
            if position < len(self._order) and self._order[position] == key:
                del self._order[position]
        if entry.get("deleted"):
            return
        self.unreadable.pop(conversation_id, None)
        summary: Summary = entry  # type: ignore[assignment]
        self.summaries[conversation_id] = summary
        bisect.insort(self._order, (summary["updated_at"], conversation_id))


# --- the store ----------------------------------------------------------------------------------

T = TypeVar("T")


@dataclass
class TurnRecord:
    """What `append_turn` saved: the conversation's id and the two new messages."""

    conversation_id: str
    user_message: Message
    reply: Message


class RecentConversations:
    """The last few conversations this process wrote, each with its file held open.

    Used only under the conversation's locks, to change it again without reading it back;
    `get` never uses it, so nobody sees an object while it is being changed.

    Why a cached copy is still the file: the descriptor of the written file stays open, so its
    inode cannot be freed and given to another file. If the path still names that inode
    (`os.path.samestat`), nobody has replaced the file since, as every writer (in any process)
    replaces the file whole. No timestamp is trusted for that; the file's size and times, as seen
    through the descriptor, only add a reason to re-read (a hand edit in place, same inode).
    """

    SIZE = 16

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[int, Conversation]] = OrderedDict()
        self._stamps: dict[int, tuple[int, int, int]] = {}
        self._lock = threading.Lock()  # different conversations change in different threads
        self._closer = weakref.finalize(self, close_all, self._items)

    def get(self, conversation_id: str, path: Path) -> Conversation | None:
        with self._lock:  # so that no other thread closes the descriptor while it is compared
            item = self._items.get(conversation_id)
            if item is None:
                return None
            with reading(conversation_id):
                on_disk = os.stat(path)
            kept = os.fstat(item[0])
            same = os.path.samestat(kept, on_disk) and stamp(kept) == self._stamps.get(item[0])
            return item[1] if same else None

    def keep(self, conversation_id: str, fd: int, conversation: Conversation) -> None:
        with self._lock:
            old = self._items.pop(conversation_id, None)
            self._items[conversation_id] = (fd, conversation)
            self._stamps[fd] = stamp(os.fstat(fd))
            while len(self._items) > self.SIZE:
                _, (evicted, _) = self._items.popitem(last=False)
                os.close(evicted)
        if old is not None:
            os.close(old[0])

    def forget(self, conversation_id: str) -> None:
        with self._lock:
            item = self._items.pop(conversation_id, None)
        if item is not None:
            os.close(item[0])

    def close(self) -> None:
        with self._lock:
            self._closer()


def stamp(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def close_all(items: OrderedDict[str, tuple[int, Conversation]]) -> None:
    while items:
        _, (fd, _) = items.popitem()
        with contextlib.suppress(OSError):
            os.close(fd)


class Store:
    """All access to conversation files. Every public method is async and never blocks the loop."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.conversations = data_dir / "conversations"
        self.journal = data_dir / "changes.log"
        self._task_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._index = ListingIndex(self.conversations, self.journal)
        self._index_lock = asyncio.Lock()
        self._recent = RecentConversations()
        self._file_locks: dict[str, FileLock] = {}
        self._writable: tuple[float, bool] = (-2.0, False)
        self._limiter: anyio.CapacityLimiter | None = None

    # set-up and health

    def open(self) -> None:
        """Create the directories owner-only and clear temp files left by a crash. Blocking: start-up only."""
        for directory in (self.data_dir, self.conversations):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        cutoff = time.time() - STALE_TEMP_SECONDS
        for entry in os.scandir(self.conversations):
            # another process's write may rename its temp file away between the scan and the stat
            with contextlib.suppress(FileNotFoundError):
                if entry.name.endswith(".tmp") and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)

    def close(self) -> None:
        """Close the files the cache holds open (also done when the Store is garbage collected)."""
        self._recent.close()

    async def writable(self) -> bool:
        """Can conversations be written? Checked at most once a second (health is polled often)."""
        checked_at, answer = self._writable
        if time.monotonic() - checked_at > 1.0:
            answer = await anyio.to_thread.run_sync(os.access, self.conversations, os.W_OK)
            self._writable = (time.monotonic(), answer)
        return answer

    # conversations

    async def create(
        self, *, model: str, system: str | None, params: Params, title: str | None = None
    ) -> Conversation:
        conversation = new_conversation(model=model, system=system, params=params, title=title)
        return await self._locked(conversation["id"], lambda: self._write_new(conversation), creating=True)

    async def get(self, conversation_id: str) -> Conversation:
        # No lock needed to read: a file is only ever replaced whole, so a reader sees old or new.
        self._check_id(conversation_id)
        return await anyio.to_thread.run_sync(self._read, conversation_id)

    async def update(self, conversation_id: str, changes: dict[str, Any]) -> Conversation:
        """Set top-level fields (title, model, system); `params` given are merged into the current ones."""

        fields = {k: v for k, v in changes.items() if k != "params"}

        def change(conversation: Conversation) -> None:
            params = {**conversation["params"], **changes.get("params", {})}
            conversation.update(fields)  # type: ignore[typeddict-item]
            conversation["params"] = params  # type: ignore[typeddict-item]

        await self._modify(conversation_id, change)
        return await self.get(conversation_id)  # a copy of its own: the one written stays cached

    async def delete(self, conversation_id: str) -> None:
        await self._locked(conversation_id, lambda: self._unlink(conversation_id))

    async def list_conversations(self, limit: int, cursor: str | None) -> tuple[list[Summary], str | None]:
        before = decode_cursor(cursor) if cursor else None
        async with self._index_lock:
            await anyio.to_thread.run_sync(self._index.refresh)
            return self._index.page(limit, before)

    async def warm_index(self) -> None:
        """Build the listing index (a scan of every file) ahead of the first listing."""
        async with self._index_lock:
            await anyio.to_thread.run_sync(self._index.refresh)

    def unreadable(self) -> dict[str, str]:
        """Files the last scan could not read (as of the last listing; no disk access)."""
        return dict(self._index.unreadable)

    # messages

    async def append_turn(
        self,
        conversation: str | Conversation,
        user_text: str,
        make_reply: Callable[[Conversation], Message],
    ) -> TurnRecord:
        """Save the user's message and, right after it, a placeholder reply marked `incomplete`.

        `conversation` is an id, or a new conversation (from `new_conversation`) saved by this same
        write. `make_reply` builds the placeholder from the conversation as read; if it raises,
        nothing is written. The placeholder is what a crash leaves behind; `finish_reply` replaces it.
        Saving both in one write keeps each reply attached to its own user message when turns overlap.
        """
        saved: list[Message] = []

        def change(current: Conversation) -> None:
            user: Message = {
                "id": new_id(),
                "parent_id": current["current_id"],
                "role": "user",
                "content": user_text,
                "created_at": now(),
            }
            placeholder = make_reply(current)
            placeholder["parent_id"] = user["id"]
            current["messages"] += [user, placeholder]
            current["current_id"] = placeholder["id"]
            if current["title"] is None:
                current["title"] = title_from(user_text)
            saved[:] = [user, placeholder]

        if isinstance(conversation, str):
            written = await self._modify(conversation, change)
        else:
            written = await self._locked(
                conversation["id"], lambda: self._apply_and_write(conversation, change), creating=True
            )
        return TurnRecord(written["id"], saved[0], saved[1])

    async def finish_reply(self, conversation_id: str, reply: Message) -> None:
        """Replace the placeholder saved by `append_turn` with the final reply."""

        def change(conversation: Conversation) -> None:
            for position, message in enumerate(conversation["messages"]):
                if message["id"] == reply["id"]:
                    conversation["messages"][position] = reply
                    return
            conversation["messages"].append(reply)  # removed meanwhile: keep the reply anyway

        await self._modify(conversation_id, change)

    # internals: everything below runs under both locks, in a worker thread

    def _check_id(self, conversation_id: str) -> None:
        if not is_valid_id(conversation_id):
            shown = conversation_id if len(conversation_id) <= 64 else conversation_id[:61] + "..."
            raise ConversationNotFound(
                f"no conversation {shown!r}: ids are 32 lowercase hex characters; "
                f"list them with GET /api/conversations"
            )

    async def _locked(self, conversation_id: str, work: Callable[[], T], creating: bool = False) -> T:
        self._check_id(conversation_id)
        lock = self._task_locks.get(conversation_id)
        if lock is None:
            lock = self._task_locks[conversation_id] = asyncio.Lock()
        async with lock:
            return await anyio.to_thread.run_sync(
                self._with_file_lock, conversation_id, work, creating, limiter=self.limiter()
            )

    def limiter(self) -> anyio.CapacityLimiter:
        """Storage's own worker threads: a burst of fsyncs never queues the rest of the app's thread work."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(16)
        return self._limiter

    def _with_file_lock(self, conversation_id: str, work: Callable[[], T], creating: bool) -> T:
        if not creating:  # an unknown id must not leave a lock file behind
            with reading(conversation_id):
                os.stat(self._path(conversation_id))
        try:
            with self._file_lock(conversation_id):
                return work()
        except OSError as exc:
            raise _os_error(exc, f"conversation {conversation_id}") from exc

    def _file_lock(self, conversation_id: str) -> FileLock:
        """One lock object per conversation, reused (building one costs more than using it).

        Not thread-local: the asyncio lock lets one task at a time use it, from any worker thread.
        """
        lock = self._file_locks.get(conversation_id)
        if lock is None:
            if len(self._file_locks) >= 1024:
                self._file_locks.clear()
            path = self.conversations / f"{conversation_id}.json.lock"
            lock = FileLock(
                path, mode=0o600, thread_local=False, preserve_lock_file=True, fallback_to_soft=False
            )
            self._file_locks[conversation_id] = lock
        return lock

    async def _modify(self, conversation_id: str, change: Callable[[Conversation], None]) -> Conversation:
        return await self._locked(
            conversation_id, lambda: self._apply_and_write(self._read_to_change(conversation_id), change)
        )

    def _apply_and_write(
        self, conversation: Conversation, change: Callable[[Conversation], None]
    ) -> Conversation:
        """Change, stamp and write; the result is kept to spare the next change a read and a parse."""
        conversation_id = conversation["id"]
        try:
            change(conversation)
            conversation["updated_at"] = now()
            fd = self._write(conversation)
        except BaseException:
            self._recent.forget(conversation_id)  # the object may be half changed
            raise
        self._recent.keep(conversation_id, fd, conversation)
        return conversation

    def _read_to_change(self, conversation_id: str) -> Conversation:
        """The conversation as this process last wrote it, if the file is still that one."""
        cached = self._recent.get(conversation_id, self._path(conversation_id))
        return cached if cached is not None else self._read(conversation_id)

    def _path(self, conversation_id: str) -> Path:
        return self.conversations / f"{conversation_id}.json"

    def _read(self, conversation_id: str) -> Conversation:
        with reading(conversation_id):
            data = self._path(conversation_id).read_bytes()
        return parse_conversation(data, conversation_id)

    def _write_new(self, conversation: Conversation) -> Conversation:
        os.close(self._write(conversation))
        return conversation

    def _write(self, conversation: Conversation) -> int:
        """Write the file; returns its descriptor, still open, for RecentConversations."""
        fd = write_durably_kept(self._path(conversation["id"]), encode(conversation))
        self._journal(orjson.dumps(summarize(conversation)))
        return fd

    def _unlink(self, conversation_id: str) -> None:
        self._recent.forget(conversation_id)
        try:
            os.unlink(self._path(conversation_id))
        except FileNotFoundError:
            raise ConversationNotFound(f"no conversation {conversation_id}") from None
        fsync_directory(self.conversations)
        self._journal(orjson.dumps({"id": conversation_id, "deleted": True}))

    def _journal(self, line: bytes) -> None:
        # A hint for listings, not the data: no fsync, and a failure only costs a stale listing
        # in other processes (the file itself is already safely written).
        try:
            fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line + b"\n")
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("could not append to %s: %s", self.journal, exc.strerror)
