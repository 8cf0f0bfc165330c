"""Conversations as JSON files: one locked, atomically and durably written file per conversation.

Layout under the data directory::

    conversations/<id>.json       the conversation (always valid JSON, schema_version inside)
    conversations/<id>.json.lock  its lock file (never deleted: waiters would lock another inode)
    index.sqlite3                 derived data (listing, search), see search_index.py; told of
                                  every write through the Store's `indexer`

Every write is a read-modify-write of one file under an asyncio lock (between tasks) and a file
lock (between processes), run in a worker thread so the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NotRequired, Protocol, TypeVar

import anyio.to_thread
import orjson
from filelock import lock_descriptor, unlock_descriptor
from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic reads only this one on Python 3.11

SCHEMA_VERSION = 2
ID_RE = re.compile(r"[0-9a-f]{32}")
FILE_RE = re.compile(r"([0-9a-f]{32})\.json")
STALE_TEMP_SECONDS = 60.0
LOCK_POLL_SECONDS = 0.002  # between attempts while another process or thread holds a lock

log = logging.getLogger("chat.storage")

Status = Literal["complete", "incomplete", "error"]


# The stored shape, described once. Each file is checked against it when read (`SHAPE`), and the
# check's output is thrown away: the file's own dict is what the service uses and writes back, so
# keys this version does not know (added by a newer one, or by hand) are kept. A new stored field
# is NotRequired here (older files lack it) and documented in SPEC.md section 4.


class Usage(TypedDict):
    input_tokens: int | None
    output_tokens: int | None
    estimated: NotRequired[bool]  # counted with tokens.estimate_*: the provider sent no usage


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
    cost: NotRequired[float | None]  # USD; None when the price is unknown
    error: NotRequired[ErrorInfo | None]
    messages_left_out: NotRequired[int]  # oldest messages of the branch not sent: the window was full
    # the client's id for the request that made this message (on the user message; on the reply
    # for a regenerate): a repeat of that request answers this turn instead of adding another
    client_message_id: NotRequired[str]


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


class Totals(TypedDict):
    input_tokens: int
    output_tokens: int
    cost: float | None  # None until some reply has a known price


SHAPE: TypeAdapter[Conversation] = TypeAdapter(Conversation)


class Summary(TypedDict):
    id: str
    title: str | None
    created_at: str
    updated_at: str
    model: str
    message_count: int
    totals: Totals


class Indexer(Protocol):
    """Derived data kept in step with every write (search_index.SearchIndex); must not raise."""

    def written(self, conversation: Conversation, stat: os.stat_result) -> None: ...

    def deleted(self, conversation_id: str) -> None: ...


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


class MessageNotFound(StorageError):
    status_code = 404
    type = "message_not_found"


class WrongMessageRole(StorageError):
    status_code = 400
    type = "wrong_message_role"


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
    return branch_to(conversation, conversation["current_id"])


def branch_to(conversation: Conversation, message_id: str | None) -> list[Message]:
    """The messages from the first one to `message_id` (none for None), following `parent_id` links."""
    by_id = {m["id"]: m for m in conversation["messages"]}
    branch: list[Message] = []
    node = by_id.get(message_id or "")
    while node is not None and len(branch) <= len(by_id):
        branch.append(node)
        node = by_id.get(node["parent_id"] or "")
    branch.reverse()
    return branch


def totals(messages: list[Message]) -> Totals:
    """Tokens and cost of every reply in every branch (what the conversation cost)."""
    result: Totals = {"input_tokens": 0, "output_tokens": 0, "cost": None}
    for message in messages:
        usage = message.get("usage")
        if usage:
            result["input_tokens"] += usage.get("input_tokens") or 0
            result["output_tokens"] += usage.get("output_tokens") or 0
        cost = message.get("cost")
        if isinstance(cost, int | float):
            result["cost"] = round((result["cost"] or 0.0) + cost, 10)
    return result


def find_message(conversation: Conversation, message_id: str) -> Message:
    for message in conversation["messages"]:
        if message["id"] == message_id:
            return message
    raise MessageNotFound(
        f"no message {message_id!r} in conversation {conversation['id']}: "
        f"see GET /api/conversations/{conversation['id']}/tree for its messages"
    )


def sibling_ids(conversation: Conversation) -> dict[str | None, list[str]]:
    """parent id -> the ids of its children, oldest first (the order in which they were added)."""
    children: dict[str | None, list[str]] = {}
    for message in conversation["messages"]:
        children.setdefault(message["parent_id"], []).append(message["id"])
    return children


def newest_leaf(conversation: Conversation, message_id: str) -> str:
    """The most recently added message with no children among `message_id` and those beneath it."""
    children = sibling_ids(conversation)
    beneath = {message_id}
    newest = message_id
    for message in conversation["messages"]:  # parents come before their children
        if message["parent_id"] in beneath:
            beneath.add(message["id"])
        if message["id"] in beneath and message["id"] not in children:
            newest = message["id"]
    return newest


def find_client_turn(conversation: Conversation, client_message_id: str) -> tuple[Message, Message] | None:
    """(user message, reply) of the turn a request with this `client_message_id` made, if any."""
    for message in conversation["messages"]:
        if message.get("client_message_id") != client_message_id:
            continue
        if message["role"] == "assistant":  # a regenerate
            return find_message(conversation, message["parent_id"] or ""), message
        for reply in conversation["messages"]:
            if reply["parent_id"] == message["id"] and reply["role"] == "assistant":
                return message, reply
    return None


def summarize(conversation: Conversation) -> Summary:
    return {
        "id": conversation["id"],
        "title": conversation["title"],
        "created_at": conversation["created_at"],
        "updated_at": conversation["updated_at"],
        "model": conversation["model"],
        "message_count": len(conversation["messages"]),
        "totals": totals(conversation["messages"]),
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


@contextlib.contextmanager
def locked_file(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created owner-only, never through a symlink) against other
    processes and other threads. Blocking.

    filelock's `lock_descriptor` is the primitive its `FileLock` uses (flock of the whole file), so
    the two exclude each other; on a descriptor of our own per use it costs about 5 µs, where a
    `FileLock` object costs about 400 µs per use (its fork tracking and lock-file bookkeeping), three
    times in every turn. A descriptor per use is also what makes threads exclude each other.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        lock_descriptor(fd, poll_interval=LOCK_POLL_SECONDS)
        try:
            yield
        finally:
            unlock_descriptor(fd)
    finally:
        os.close(fd)


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


# --- the store ----------------------------------------------------------------------------------

T = TypeVar("T")


@dataclass
class TurnRecord:
    """What `append_turn` or `add_reply` saved: the conversation's id and the turn's messages.

    `repeated`: nothing was written, the turn is the one an earlier request with the same
    `client_message_id` made.
    """

    conversation_id: str
    user_message: Message
    reply: Message
    repeated: bool = False
    sibling_ids: list[str] = field(default_factory=list)  # the reply's, as of this write


class NothingToWrite(Exception):
    """Raised inside a change to leave the file as it is."""


class RepeatedTurn(NothingToWrite):
    """The request was made before: nothing is written, the earlier turn is the answer."""

    def __init__(self, conversation: Conversation, user_message: Message, reply: Message) -> None:
        super().__init__("repeated")
        self.turn = (user_message, reply)
        self.sibling_ids = sibling_ids(conversation)[reply["parent_id"]]


CURRENT = "current"  # append_turn's default parent: the conversation's current leaf


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

    def __init__(self, data_dir: Path, indexer: Indexer | None = None) -> None:
        self.data_dir = data_dir
        self.conversations = data_dir / "conversations"
        self.indexer = indexer
        self._task_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._recent = RecentConversations()
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

    async def add(self, conversation: Conversation) -> bool:
        """Save a conversation built elsewhere (an import) under its own id, as it is: create-only.

        False, and nothing written, when a conversation with that id already exists.
        """
        return await self._locked(conversation["id"], lambda: self._write_if_new(conversation), creating=True)

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

    # messages

    async def append_turn(
        self,
        conversation: str | Conversation,
        user_text: str,
        make_reply: Callable[[Conversation], Message],
        *,
        edit_of: str | None = None,
        client_message_id: str | None = None,
    ) -> TurnRecord:
        """Save the user's message and, right after it, a placeholder reply marked `incomplete`.

        `conversation` is an id, or a new conversation (from `new_conversation`) saved by this same
        write. The user's message follows the current leaf, or with `edit_of` (a user message's id)
        goes beside that message: a new branch. `make_reply(conversation)` builds the placeholder
        from the conversation as read; if it raises, nothing is written. The placeholder is what a
        crash leaves behind; `finish_reply` replaces it. Saving both in one write keeps each reply attached to
        its own user message when turns overlap. A `client_message_id` already in the conversation
        writes nothing and returns that earlier turn (`repeated`).
        """

        def change(current: Conversation) -> list[Message]:
            parent_id = current["current_id"]
            if edit_of is not None:
                parent_id = self._of_role(current, edit_of, "user", "edit")["parent_id"]
            user: Message = {
                "id": new_id(),
                "parent_id": parent_id,
                "role": "user",
                "content": user_text,
                "created_at": now(),
            }
            if client_message_id is not None:
                user["client_message_id"] = client_message_id
            placeholder = make_reply(current)
            placeholder["parent_id"] = user["id"]
            current["messages"] += [user, placeholder]
            current["current_id"] = placeholder["id"]
            if current["title"] is None:
                current["title"] = title_from(user_text)
            return [user, placeholder]

        if isinstance(conversation, str):
            return await self._add(conversation, change, client_message_id)
        saved: list[Message] = []
        written = await self._locked(
            conversation["id"],
            lambda: self._apply_and_write(conversation, lambda c: saved.extend(change(c))),
            creating=True,
        )
        return TurnRecord(written["id"], saved[0], saved[1], sibling_ids=[saved[1]["id"]])

    async def add_reply(
        self,
        conversation_id: str,
        reply_id: str,
        make_reply: Callable[[Conversation, Message], Message],
        *,
        client_message_id: str | None = None,
    ) -> TurnRecord:
        """Regenerate: a new placeholder reply beside `reply_id` (same user message), made current."""

        def change(current: Conversation) -> list[Message]:
            old = self._of_role(current, reply_id, "assistant", "regenerate")
            user = find_message(current, old["parent_id"] or "")
            placeholder = make_reply(current, user)
            placeholder["parent_id"] = user["id"]
            if client_message_id is not None:
                placeholder["client_message_id"] = client_message_id
            current["messages"].append(placeholder)
            current["current_id"] = placeholder["id"]
            return [user, placeholder]

        return await self._add(conversation_id, change, client_message_id)

    async def set_current(self, conversation_id: str, message_id: str) -> Conversation:
        """Show the branch through `message_id`: the current leaf becomes the newest leaf beneath it.

        `updated_at` is kept: flipping between versions does not move a conversation up the list.
        """

        def change(conversation: Conversation) -> None:
            find_message(conversation, message_id)
            conversation["current_id"] = newest_leaf(conversation, message_id)

        await self._modify(conversation_id, change, touch=False)
        return await self.get(conversation_id)

    async def set_generated_title(self, conversation_id: str, title: str) -> bool:
        """Set a generated title if the title is still the fallback made from the first message.

        False (nothing written) if the title is another: the user's own is never replaced.
        """

        def change(conversation: Conversation) -> None:
            first = next((m for m in conversation["messages"] if m["parent_id"] is None), None)
            if first is None or conversation["title"] != title_from(first["content"]):
                raise NothingToWrite
            conversation["title"] = title

        try:
            await self._modify(conversation_id, change, touch=False)
        except NothingToWrite:
            return False
        return True

    async def _add(
        self,
        conversation_id: str,
        change: Callable[[Conversation], list[Message]],
        client_message_id: str | None,
    ) -> TurnRecord:
        def add(current: Conversation) -> None:
            if client_message_id is not None and (turn := find_client_turn(current, client_message_id)):
                raise RepeatedTurn(current, *turn)
            user, reply = change(current)
            saved.extend([user, reply])
            siblings.extend(m["id"] for m in current["messages"] if m["parent_id"] == user["id"])

        saved: list[Message] = []
        siblings: list[str] = []
        try:
            await self._modify(conversation_id, add)
        except RepeatedTurn as repeat:
            return TurnRecord(conversation_id, *repeat.turn, repeated=True, sibling_ids=repeat.sibling_ids)
        return TurnRecord(conversation_id, saved[0], saved[1], sibling_ids=siblings)

    @staticmethod
    def _of_role(conversation: Conversation, message_id: str, role: str, action: str) -> Message:
        message = find_message(conversation, message_id)
        if message["role"] != role:
            other = "regenerate" if action == "edit" else "edit"
            raise WrongMessageRole(
                f"message {message_id} is a {message['role']} message; {action} takes a {role} "
                f"message's id (to change a {message['role']} message, use {other})"
            )
        return message

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
            with locked_file(self.conversations / f"{conversation_id}.json.lock"):
                return work()
        except OSError as exc:
            raise _os_error(exc, f"conversation {conversation_id}") from exc

    async def _modify(
        self, conversation_id: str, change: Callable[[Conversation], None], touch: bool = True
    ) -> Conversation:
        return await self._locked(
            conversation_id,
            lambda: self._apply_and_write(self._read_to_change(conversation_id), change, touch),
        )

    def _apply_and_write(
        self, conversation: Conversation, change: Callable[[Conversation], None], touch: bool = True
    ) -> Conversation:
        """Change, stamp (unless `touch` is False) and write; the result is kept for the next change."""
        conversation_id = conversation["id"]
        try:
            change(conversation)
            if touch:
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

    def _write_if_new(self, conversation: Conversation) -> bool:
        if self._path(conversation["id"]).exists():
            return False
        os.close(self._write(conversation))
        return True

    def _write(self, conversation: Conversation) -> int:
        """Write the file and tell the index; returns its descriptor, still open, for RecentConversations."""
        fd = write_durably_kept(self._path(conversation["id"]), encode(conversation))
        stat = os.fstat(fd)
        self._index(lambda indexer: indexer.written(conversation, stat))
        return fd

    def _unlink(self, conversation_id: str) -> None:
        self._recent.forget(conversation_id)
        try:
            os.unlink(self._path(conversation_id))
        except FileNotFoundError:
            raise ConversationNotFound(f"no conversation {conversation_id}") from None
        fsync_directory(self.conversations)
        self._index(lambda indexer: indexer.deleted(conversation_id))

    def _index(self, update: Callable[[Indexer], None]) -> None:
        # The file is the truth and already safely written: a failed index update never fails the
        # write (the index's next reconcile repairs it).
        if self.indexer is None:
            return
        try:
            update(self.indexer)
        except Exception:
            log.exception("could not update the index after a write; the next reconcile repairs it")
