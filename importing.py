"""Import conversations from an export: ours, ChatGPT's or Claude.ai's.

`POST /api/import` streams the upload to a private folder under the data directory and
`python main.py import FILE...` reads files in place; both then read the export here:

    detect (zip, JSON array, JSON object) -> one conversation at a time (ijson) -> our shape -> Store.add

Every branch of a source tree is kept. A source message that has no place in ours (a tool step, a
hidden node, a thinking block, an image) is dropped and counted, and its children hang from its
nearest kept ancestor, so the tree never breaks. An imported conversation's id is derived from its
source id, and `source` records where it came from: importing the same export twice adds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import re
import secrets
import shutil
import sys
import time
import uuid
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import anyio.to_thread
import ijson  # type: ignore[import-untyped]
import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from storage import (
    SCHEMA_VERSION,
    Conversation,
    ConversationUnreadable,
    Message,
    Store,
    current_branch,
    is_valid_id,
    now,
    parse_conversation,
    title_from,
)
from web import JSON, StoreDep, error

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

IMPORT_PATH = "/api/import"
ALREADY_IMPORTED = "already imported"
BATCH = 64  # conversations read per thread hop, and written concurrently
UPLOAD_CHUNK = 1024 * 1024  # bytes gathered before a write to disk
STALE_WORKDIR_SECONDS = 24 * 3600
CLAUDE_ROOT = "00000000-0000-4000-8000-000000000000"
OURS_RE = re.compile(r"(?:^|/)conversations/([0-9a-f]{32})\.json$")
SHARD_RE = re.compile(r"(?:^|/)conversations(?:-\d+)?\.json$")

Kind = Literal["ours", "chatgpt", "claude"]
KIND_NAMES: dict[Kind, str] = {"ours": "this service's", "chatgpt": "ChatGPT", "claude": "Claude.ai"}


# --- errors -------------------------------------------------------------------------------------


class ImportRefused(Exception):
    """The export as a whole cannot be imported; carries the HTTP answer."""

    status_code = 400
    type = "unknown_import_format"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class UnknownFormat(ImportRefused):
    type = "unknown_import_format"


class NothingToImport(ImportRefused):
    type = "nothing_to_import"


class UploadTooLarge(ImportRefused):
    status_code = 413
    type = "body_too_large"


class ExportTooLarge(ImportRefused):
    status_code = 413
    type = "import_too_large"


class BadConversation(Exception):
    """One conversation of an export cannot be read: it is skipped and reported, the rest go on."""


# --- what reading an export yields --------------------------------------------------------------


@dataclass
class Converted:
    conversation: Conversation
    source_id: str
    dropped: Counter[str]


@dataclass
class Skipped:
    source_id: str | None
    title: str | None
    reason: str


@dataclass
class Section:
    """One file of the export, as found: what the report says when nothing could be imported."""

    description: str


Found = Converted | Skipped | Section


@dataclass
class Report:
    imported: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    sections: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "skipped": self.skipped,
            "dropped": dict(sorted(self.dropped.items())),
        }

    def skip(self, source_id: str | None, title: str | None, reason: str) -> None:
        self.skipped.append({"source_id": source_id, "title": title, "reason": reason})

    def summary(self) -> str:
        reasons = Counter(
            s["reason"] if s["reason"] == ALREADY_IMPORTED else "unreadable" for s in self.skipped
        )
        line = f"imported {len(self.imported)}, skipped {len(self.skipped)}"
        if reasons:
            line += " (" + ", ".join(f"{why}: {n}" for why, n in sorted(reasons.items())) + ")"
        if self.dropped:
            line += "; dropped " + ", ".join(f"{kind} {n}" for kind, n in sorted(self.dropped.items()))
        return line


# --- small helpers ------------------------------------------------------------------------------


def derived_id(*parts: str) -> str:
    """A stable id: the same source gives the same conversation, so a second import adds nothing."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


class MessageIds:
    """Our message ids for one conversation's source ids: the UUID's hex where it is one, else a hash."""

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.used: set[str] = set()

    def make(self, source_id: str) -> str:
        try:
            candidate = uuid.UUID(source_id).hex
        except ValueError:
            candidate = derived_id(self.conversation_id, source_id)
        if candidate in self.used:
            candidate = derived_id(self.conversation_id, source_id, str(len(self.used)))
        self.used.add(candidate)
        return candidate


def stamp(moment: datetime) -> str:
    """Our timestamp format (storage.now's), e.g. 2023-11-14T22:13:20.000000Z."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def from_epoch(value: Any) -> str | None:
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return stamp(datetime.fromtimestamp(value, UTC)) if number and 0 < value < 1e11 else None


def from_iso(value: Any) -> str | None:
    """An ISO timestamp in our format; None for anything else, or a moment outside years 1-9999 in UTC."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
        return stamp(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    except (ValueError, OverflowError):
        return None


def obj(value: Any) -> dict[str, Any]:
    """An object field of untrusted JSON, or an empty one when it is anything else."""
    return value if isinstance(value, dict) else {}


def text_of(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) and value else None


def fenced(text: str, language: str = "") -> str:
    """A Markdown code block whose fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def quoted(text: str, title: str | None, url: str | None) -> str:
    body = "\n".join(f"> {line}" if line else ">" for line in text.splitlines())
    origin = f"[{title or url}]({url})" if url else title
    return f"{body}\n\n— {origin}" if origin else body


def user_message(message_id: str, text: str, created_at: str) -> Message:
    return {"id": message_id, "parent_id": None, "role": "user", "content": text, "created_at": created_at}


def reply_message(
    message_id: str, text: str, created_at: str, model: str | None, status: str, finish: str | None
) -> Message:
    reply: Message = {
        "id": message_id,
        "parent_id": None,
        "role": "assistant",
        "content": text,
        "created_at": created_at,
        "params": {"temperature": None, "max_tokens": None},
        "status": "complete" if status == "complete" else "incomplete",
        "finish_reason": finish if status == "complete" else None,
        "usage": None,
        "error": None,
    }
    if model is not None:  # unknown (Claude.ai exports do not say): absent rather than invented
        reply["model"] = model
    return reply


# --- the tree -----------------------------------------------------------------------------------


@dataclass
class Node:
    """One node of a source tree: kept (`message`) or dropped (counted as `dropped`, if anything)."""

    source_id: str
    parent: str | None
    message: Message | None = None
    dropped: str | None = None


def rebuild_tree(
    nodes: list[Node], current: str | None, drops: Counter[str]
) -> tuple[list[Message], str | None]:
    """Kept messages, parents first; a dropped node's children hang from its nearest kept ancestor.

    Returns the messages and the id standing for `current` (the source's current leaf, or the
    nearest kept message above it; the last message when the source names none).
    """
    known = {node.source_id for node in nodes}
    children: dict[str | None, list[Node]] = defaultdict(list)
    for node in nodes:
        parent = node.parent if node.parent in known and node.parent != node.source_id else None
        children[parent].append(node)
    messages: list[Message] = []
    standing_for: dict[str, str | None] = {}
    stack: list[tuple[Node, str | None]] = [(node, None) for node in reversed(children[None])]
    while stack:
        node, parent_id = stack.pop()
        if node.source_id in standing_for:
            continue
        if node.message is not None:
            node.message["parent_id"] = parent_id
            messages.append(node.message)
            parent_id = node.message["id"]
        elif node.dropped:
            drops[node.dropped] += 1
        standing_for[node.source_id] = parent_id
        stack.extend((child, parent_id) for child in reversed(children[node.source_id]))
    unreachable = sum(1 for node in nodes if node.source_id not in standing_for and node.message is not None)
    if unreachable:  # a cycle of parents: no path from a root
        drops["unreachable"] += unreachable
    chosen = standing_for.get(current) if current is not None else None
    return messages, chosen if chosen is not None else (messages[-1]["id"] if messages else None)


def finish_conversation(
    *,
    kind: Kind,
    source_id: str,
    title: str | None,
    created_at: str,
    updated_at: str | None,
    model: str,
    system: str | None,
    messages: list[Message],
    current_id: str | None,
) -> Conversation:
    if not messages:
        raise BadConversation("holds no message that could be imported")
    if title is None:
        first_user = next((m for m in messages if m["role"] == "user" and m["content"].strip()), None)
        title = title_from(first_user["content"]) if first_user else None
    conversation: Conversation = {
        "schema_version": SCHEMA_VERSION,
        "id": derived_id(kind, source_id),
        "title": title,
        "created_at": created_at,
        "updated_at": updated_at or max(m["created_at"] for m in messages),
        "model": model,
        "system": system,
        "params": {"temperature": None, "max_tokens": None},
        "current_id": current_id,
        "messages": messages,
    }
    conversation["source"] = {"kind": kind, "id": source_id}  # type: ignore[typeddict-unknown-key]
    return conversation


def branch_model(messages: list[Message], current_id: str | None) -> str | None:
    """The model of the last reply on the current branch that names one."""
    branch = current_branch({"messages": messages, "current_id": current_id})  # type: ignore[typeddict-item]
    return next((m["model"] for m in reversed(branch) if "model" in m), None)


# --- ChatGPT ------------------------------------------------------------------------------------


@dataclass
class Dropped:
    kind: str


@dataclass
class Instructions:
    text: str


THINKING = frozenset({"thoughts", "reasoning_recap"})
TOOL_CONTENT = {"execution_output": "tool", "tether_browsing_display": "browsing"}


def from_chatgpt(doc: dict[str, Any], fallback_model: str) -> Converted:
    source_id = text_of(doc, "conversation_id") or text_of(doc, "id")
    if source_id is None:
        raise BadConversation("has no conversation_id")
    mapping = doc.get("mapping")
    if not isinstance(mapping, dict):
        raise BadConversation("has no 'mapping' object holding its messages")
    ids = MessageIds(derived_id("chatgpt", source_id))
    created_at = from_epoch(doc.get("create_time")) or now()
    drops: Counter[str] = Counter()
    system: str | None = None
    nodes: list[Node] = []
    times: dict[str, str] = {}
    for key, raw in sorted(mapping.items(), key=lambda item: chatgpt_time(item[1])):
        if not isinstance(raw, dict):
            drops["malformed"] += 1
            continue
        parent = raw.get("parent") if isinstance(raw.get("parent"), str) else None
        node = Node(str(key), parent)
        message = raw.get("message")
        if isinstance(message, dict):
            moment = from_epoch(message.get("create_time")) or times.get(parent or "") or created_at
            times[node.source_id] = moment
            outcome = chatgpt_message(message, ids.make(node.source_id), moment, drops)
            if isinstance(outcome, Instructions):
                system = system or outcome.text or None
            elif isinstance(outcome, Dropped):
                node.dropped = outcome.kind
            else:
                node.message = outcome
        nodes.append(node)
    current = doc.get("current_node") if isinstance(doc.get("current_node"), str) else None
    messages, current_id = rebuild_tree(nodes, current, drops)
    slug = text_of(doc, "default_model_slug")
    model = branch_model(messages, current_id) or (f"openai/{slug}" if slug else fallback_model)
    conversation = finish_conversation(
        kind="chatgpt",
        source_id=source_id,
        title=text_of(doc, "title"),
        created_at=created_at,
        updated_at=from_epoch(doc.get("update_time")),
        model=model,
        system=system,
        messages=messages,
        current_id=current_id,
    )
    return Converted(conversation, source_id, drops)


def chatgpt_time(node: Any) -> float:
    message = node.get("message") if isinstance(node, dict) else None
    moment = message.get("create_time") if isinstance(message, dict) else None
    return float(moment) if isinstance(moment, int | float) and math.isfinite(moment) else 0.0


def chatgpt_message(
    message: dict[str, Any], message_id: str, created_at: str, drops: Counter[str]
) -> Message | Dropped | Instructions:
    author = obj(message.get("author"))
    role = author.get("role")
    content = obj(message.get("content"))
    content_type = content.get("content_type")
    metadata = obj(message.get("metadata"))
    if content_type == "user_editable_context":  # the user's custom instructions
        parts = [content.get(k) for k in ("user_profile", "user_instructions")]
        return Instructions("\n\n".join(p.strip() for p in parts if isinstance(p, str) and p.strip()))
    if metadata.get("is_visually_hidden_from_conversation"):
        return Dropped("hidden")
    if role == "system":
        return Dropped("system")
    if content_type in THINKING or message.get("channel") == "analysis":
        return Dropped("thinking")
    if role == "tool" and content_type != "tether_quote":
        return Dropped(TOOL_CONTENT.get(str(content_type), "tool"))
    recipient = message.get("recipient", "all")
    if role == "assistant" and recipient not in (None, "all") and content_type != "code":
        return Dropped("tool_call")
    if role not in ("user", "assistant", "tool"):
        return Dropped("other_role")
    text = chatgpt_text(content, drops)
    if text is None:
        return Dropped(f"unsupported:{content_type}")
    finish = obj(metadata.get("finish_details"))
    interrupted = message.get("status") == "in_progress" or finish.get("type") == "interrupted"
    if not text.strip() and not interrupted:
        return Dropped("empty")
    if role == "user":
        return user_message(message_id, text, created_at)
    slug = metadata.get("model_slug")
    model = f"openai/{slug}" if isinstance(slug, str) and slug else None
    reason = finish.get("type") if isinstance(finish.get("type"), str) else None
    return reply_message(
        message_id, text, created_at, model, "incomplete" if interrupted else "complete", reason
    )


def chatgpt_text(content: dict[str, Any], drops: Counter[str]) -> str | None:
    """The text of a ChatGPT content object; None when its type has no place in our messages."""
    content_type = content.get("content_type")
    if content_type in ("text", "multimodal_text"):
        pieces = [chatgpt_part(part, drops) for part in content.get("parts") or []]
        return "\n\n".join(piece for piece in pieces if piece)
    if content_type == "code":
        language = content.get("language")
        language = language if isinstance(language, str) and language != "unknown" else ""
        return fenced(str(content.get("text") or ""), language)
    if content_type == "tether_quote":
        return quoted(str(content.get("text") or ""), text_of(content, "title"), text_of(content, "url"))
    return None


def chatgpt_part(part: Any, drops: Counter[str]) -> str:
    if isinstance(part, str):
        return part
    part = obj(part)
    part_type = part.get("content_type")
    if part_type == "audio_transcription" and isinstance(part.get("text"), str):
        return str(part["text"])
    if part_type == "image_asset_pointer":
        drops["image"] += 1
        return "[image not imported]"
    drops[str(part_type or "attachment")] += 1
    return ""


# --- Claude.ai ----------------------------------------------------------------------------------


def from_claude(doc: dict[str, Any], fallback_model: str) -> Converted:
    source_id = text_of(doc, "uuid")
    if source_id is None:
        raise BadConversation("has no uuid")
    raw_messages = doc.get("chat_messages")
    if not isinstance(raw_messages, list):
        raise BadConversation("has no 'chat_messages' list")
    ids = MessageIds(derived_id("claude", source_id))
    created_at = from_iso(doc.get("created_at")) or now()
    name = text_of(doc, "model")
    model = f"anthropic/{name}" if name else None
    drops: Counter[str] = Counter()
    nodes: list[Node] = []
    previous: str | None = None
    moment = created_at
    for position, item in enumerate(raw_messages):
        if not isinstance(item, dict):
            drops["malformed"] += 1
            continue
        key = text_of(item, "uuid") or f"position-{position}"
        parent = item.get("parent_message_uuid", previous)  # older exports: a plain list, in order
        parent = None if parent == CLAUDE_ROOT or not isinstance(parent, str) else parent
        moment = from_iso(item.get("created_at")) or moment
        node = Node(key, parent)
        outcome = claude_message(item, ids.make(key), moment, model, drops)
        if isinstance(outcome, Dropped):
            node.dropped = outcome.kind
        else:
            node.message = outcome
        nodes.append(node)
        previous = key
    current = text_of(doc, "current_leaf_message_uuid") or previous
    messages, current_id = rebuild_tree(nodes, current, drops)
    conversation = finish_conversation(
        kind="claude",
        source_id=source_id,
        title=text_of(doc, "name"),
        created_at=created_at,
        updated_at=from_iso(doc.get("updated_at")),
        model=model or fallback_model,
        system=None,
        messages=messages,
        current_id=current_id,
    )
    return Converted(conversation, source_id, drops)


CLAUDE_BLOCK_KINDS = {
    "thinking": "thinking",
    "redacted_thinking": "thinking",
    "tool_use": "tool_call",
    "tool_result": "tool",
    "image": "image",
}


def claude_message(
    item: dict[str, Any], message_id: str, created_at: str, model: str | None, drops: Counter[str]
) -> Message | Dropped:
    sender = item.get("sender")
    if sender not in ("human", "assistant"):
        return Dropped("other_role")
    blocks = item.get("content")
    if isinstance(blocks, list) and blocks:
        text = "\n\n".join(piece for block in blocks if (piece := claude_block(obj(block), drops)))
    else:
        text = str(item.get("text") or "")
    text = "\n\n".join(piece for piece in [text, *claude_attachments(item, drops)] if piece)
    if not text.strip():
        return Dropped("empty")
    if sender == "human":
        return user_message(message_id, text, created_at)
    return reply_message(message_id, text, created_at, model, "complete", None)


def claude_block(block: dict[str, Any], drops: Counter[str]) -> str:
    """A content block's text; thinking and tool blocks have no place in our messages and are counted."""
    block_type = block.get("type")
    if block_type == "text":
        return str(block.get("text") or "")
    drops[CLAUDE_BLOCK_KINDS.get(str(block_type), f"unsupported:{block_type}")] += 1
    return ""


def claude_attachments(item: dict[str, Any], drops: Counter[str]) -> list[str]:
    """Attached files' extracted text, as code blocks; files without text (images) are counted."""
    pieces = []
    for attachment in item.get("attachments") or []:
        extracted = attachment.get("extracted_content") if isinstance(attachment, dict) else None
        if isinstance(extracted, str) and extracted:
            name = text_of(attachment, "file_name") or "attachment"
            pieces.append(f"{name}:\n\n{fenced(extracted)}")
        else:
            drops["file"] += 1
    drops["file"] += sum(1 for _ in item.get("files") or [])
    return pieces


# --- ours ---------------------------------------------------------------------------------------


def from_ours(data: bytes, conversation_id: str) -> Converted:
    """A conversation file as this service writes it: kept whole, id and unknown keys included."""
    try:
        conversation = parse_conversation(data, conversation_id)
    except ConversationUnreadable as exc:
        raise BadConversation(exc.detail.split("; repair", 1)[0]) from None
    return Converted(conversation, conversation_id, Counter())


def ours_id(doc: dict[str, Any]) -> str:
    conversation_id = doc.get("id")
    if not isinstance(conversation_id, str) or not is_valid_id(conversation_id):
        raise BadConversation("has no id of 32 lowercase hex characters")
    return conversation_id


def kind_of(doc: Any) -> Kind | None:
    if not isinstance(doc, dict):
        return None
    if "mapping" in doc:
        return "chatgpt"
    if "chat_messages" in doc:
        return "claude"
    if "schema_version" in doc and "messages" in doc:
        return "ours"
    return None


def convert(doc: Any, kind: Kind, fallback_model: str) -> Converted:
    if kind_of(doc) != kind:
        raise BadConversation(f"is not a {KIND_NAMES[kind]} conversation like the others in its file")
    if kind == "chatgpt":
        return from_chatgpt(doc, fallback_model)
    if kind == "claude":
        return from_claude(doc, fallback_model)
    return from_ours(orjson.dumps(doc), ours_id(doc))


def converted_or_skipped(doc: Any, kind: Kind, fallback_model: str) -> Converted | Skipped:
    try:
        return convert(doc, kind, fallback_model)
    except (BadConversation, AttributeError, KeyError, TypeError, ValueError) as exc:
        source_id, title = source_of(doc)
        reason = (
            str(exc)
            if isinstance(exc, BadConversation)
            else f"could not be read ({type(exc).__name__}: {exc})"
        )
        return Skipped(source_id, title, reason)


def source_of(doc: Any) -> tuple[str | None, str | None]:
    if not isinstance(doc, dict):
        return None, None
    source_id = next((v for k in ("conversation_id", "uuid", "id") if isinstance(v := doc.get(k), str)), None)
    title = next((v for k in ("title", "name") if isinstance(v := doc.get(k), str)), None)
    return source_id, title


# --- reading an export --------------------------------------------------------------------------


@dataclass
class Member:
    """One file of an export: a zip entry, a file in a folder, or the file itself."""

    name: str
    open: Callable[[], IO[bytes]]
    unpacked: int = 0  # a zip entry's size once unpacked, as its central directory declares


def members_of(path: Path, name: str, stack: contextlib.ExitStack) -> tuple[str, list[Member]]:
    """What the path is (for messages) and its files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return f"a folder of {len(files)} files", [
            file_member(p, p.relative_to(path).as_posix()) for p in files
        ]
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":
        return "a file", [file_member(path, name)]
    try:
        archive = stack.enter_context(zipfile.ZipFile(path))
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnknownFormat(
            f"found a file that starts like a zip but is not a readable one ({first_line(exc)})"
        ) from None
    entries = [info for info in archive.infolist() if not info.is_dir()]
    if any(info.flag_bits & 0x1 for info in entries):  # zipfile would need the password
        raise UnknownFormat(
            "found an encrypted (password-protected) zip; unpack it and import conversations.json"
        )
    return f"a zip of {len(entries)} files", [zip_member(archive, info) for info in entries]


def zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    return Member(info.filename, lambda: archive.open(info), info.file_size)


def file_member(path: Path, name: str) -> Member:
    return Member(name, lambda: open(path, "rb"))


def read_export(
    path: Path, limit: int, fallback_model: str, stack: contextlib.ExitStack, name: str | None = None
) -> Iterator[Found]:
    """Every conversation of the export, converted or skipped; refuses what is no export we know."""
    what, members = members_of(path, name or path.name, stack)
    if len(members) == 1 and what == "a file":
        yield from read_json(members[0], fallback_model, alone=True)
        return
    ours = [m for m in members if OURS_RE.search(m.name)]
    shards = sorted((m for m in members if SHARD_RE.search(m.name)), key=lambda m: shard_order(m.name))
    if not ours and not shards:
        names = listing([m.name for m in members])
        raise UnknownFormat(
            f"found {what} ({names or 'empty'}) without conversations.json, conversations-000.json ... "
            f"or conversations/<id>.json; import a ChatGPT or Claude.ai export, or one made by this service"
        )
    check_unpacked([*ours, *shards], limit)
    if ours:
        yield Section(f"{what} with {len(ours)} conversation files of this service")
    for member in [*ours, *shards]:
        yield from read_member(member, fallback_model)


# What reading a zip entry raises when its bytes are damaged (CRC, deflate stream, truncation) or
# packed in a way zipfile cannot unpack.
DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


def read_member(member: Member, fallback_model: str) -> Iterator[Found]:
    """One file of a zip or folder; one that cannot be unpacked is reported, and the others still land."""
    try:
        if OURS_RE.search(member.name):
            yield read_ours(member)
        else:
            yield from read_json(member, fallback_model, alone=False)
    except DAMAGED as exc:
        problem = f"{member.name} is damaged and could not be unpacked ({first_line(exc)})"
        yield Skipped(None, member.name, problem)


def check_unpacked(members: list[Member], limit: int) -> None:
    """Refuse a zip whose conversation files unpack past `limit` (images and the rest are never read).

    zipfile never reads an entry past its declared size, so the declared sum bounds what is unpacked.
    """
    unpacked = sum(member.unpacked for member in members)
    if unpacked > limit:
        raise ExportTooLarge(
            f"the conversation files in the zip unpack to {unpacked} bytes; the limit is {limit} bytes "
            "(CHAT_MAX_IMPORT_BYTES)"
        )


def shard_order(name: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", name.rsplit("/", 1)[-1])
    return (int(digits[-1]) if digits else -1, name)


def read_ours(member: Member) -> Converted | Skipped:
    conversation_id = OURS_RE.search(member.name).group(1)  # type: ignore[union-attr]
    with member.open() as f:
        data = f.read()
    try:
        return from_ours(data, conversation_id)
    except BadConversation as exc:
        return Skipped(conversation_id, None, str(exc))


MAGIC = {
    b"%PDF": "a PDF document",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"\x1f\x8b": "a gzip file (unpack it first)",
    b"<": "an HTML or XML page (chat.html is not read: import conversations.json or the zip)",
}


def read_json(member: Member, fallback_model: str, *, alone: bool) -> Iterator[Found]:
    """A JSON file: an array of conversations (read one at a time), or one conversation object."""
    with member.open() as f:
        head = f.read(4096)
        f.seek(0)  # a zip entry seeks back by reading again from its start: cheap for 4 KiB
        start = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        if start == b"[":
            yield from read_array(f, member.name, fallback_model, alone=alone)
        elif start == b"{":
            yield from read_object(f.read(), member.name, fallback_model)
        else:
            head = head[:16]
            found = next((what for magic, what in MAGIC.items() if head.startswith(magic)), None)
            found = found or (
                "an empty file" if not head.strip() else "a file that is neither a zip nor JSON"
            )
            problem = f"{member.name} is {found}"
            if alone:
                raise UnknownFormat(f"found {found}; {HOW_TO}")
            yield Skipped(None, member.name, problem)


HOW_TO = (
    "import conversations.json or the zip of a ChatGPT or Claude.ai export, or a file or zip "
    "exported by this service"
)


def read_array(f: IO[bytes], name: str, fallback_model: str, *, alone: bool) -> Iterator[Found]:
    items = ijson.items(f, "item", use_float=True)
    count = 0
    kind: Kind | None = None
    try:
        for doc in items:
            if kind is None:
                kind = kind_of(doc)
                if kind is None:
                    described = describe(doc)
                    if alone:
                        raise UnknownFormat(f"found a JSON array of {described} in {name}; {HOW_TO}")
                    yield Skipped(None, name, f"{name} is an array of {described}, not conversations")
                    return
                yield Section(f"{name}: {KIND_NAMES[kind]} conversations")
            count += 1
            yield converted_or_skipped(doc, kind, fallback_model)
    except ijson.JSONError as exc:
        if alone and count == 0:
            raise UnknownFormat(
                f"found {name}, which starts like JSON but is not valid JSON ({first_line(exc)}); {HOW_TO}"
            ) from None
        yield Skipped(
            None, name, f"{name} is cut off or not valid JSON after {count} conversations ({first_line(exc)})"
        )
        return
    if kind is None:
        yield Section(f"{name}: an empty list")


def read_object(data: bytes, name: str, fallback_model: str) -> Iterator[Found]:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UnknownFormat(
            f"found {name}, which starts like JSON but is not valid JSON ({first_line(exc)}); {HOW_TO}"
        ) from None
    kind = kind_of(doc)
    if kind is None:
        raise UnknownFormat(
            f"found a JSON object with {describe_keys(doc)} in {name}; {sharded_hint(doc)}{HOW_TO}"
        )
    yield Section(f"{name}: one {KIND_NAMES[kind]} conversation")
    if kind == "ours":
        try:
            yield from_ours(data, ours_id(doc))
        except BadConversation as exc:
            yield Skipped(*source_of(doc), str(exc))
        return
    yield converted_or_skipped(doc, kind, fallback_model)


def describe(doc: Any) -> str:
    return f"objects with {describe_keys(doc)}" if isinstance(doc, dict) else f"{type(doc).__name__} values"


def describe_keys(doc: dict[str, Any]) -> str:
    keys = sorted(str(k) for k in doc)
    return "keys " + listing(keys) if keys else "no keys"


def listing(names: list[str]) -> str:
    """The first few names of untrusted content, each cut short: an error detail stays a line."""
    shown = [name if len(name) <= 60 else name[:57] + "..." for name in names[:8]]
    return ", ".join(shown) + (", ..." if len(names) > 8 else "")


def sharded_hint(doc: dict[str, Any]) -> str:
    text = orjson.dumps(doc)[:65536]
    if b"conversations-" in text:
        return "it is the index of a sharded ChatGPT export: import the zip or its conversations-NNN.json; "
    return ""


# --- importing ----------------------------------------------------------------------------------


def first_line(exc: Exception) -> str:
    """ijson's messages draw a pointer under the text on the lines that follow."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def take(found: Iterator[Found], count: int) -> list[Found]:
    return list(itertools.islice(found, count))


async def import_export(
    store: Store, path: Path, *, limit: int, fallback_model: str, name: str | None = None
) -> Report:
    """Read the export at `path` and save each conversation not already there; the report."""
    report = Report()
    with contextlib.ExitStack() as stack:
        found = read_export(path, limit, fallback_model, stack, name)
        while batch := await anyio.to_thread.run_sync(take, found, BATCH):
            await save_batch(store, batch, report)
    if not report.imported and not any(s["reason"] == ALREADY_IMPORTED for s in report.skipped):
        what = "; ".join(report.sections) or "no conversations"
        raise NothingToImport(
            f"found {what}, and no conversation that could be imported; {HOW_TO}", skipped=report.skipped
        )
    return report


async def save_batch(store: Store, batch: list[Found], report: Report) -> None:
    candidates = [item for item in batch if isinstance(item, Converted)]
    saved = await asyncio.gather(*(store.add(item.conversation) for item in candidates))
    outcome = dict(zip((id(item) for item in candidates), saved, strict=True))
    for item in batch:
        if isinstance(item, Section):
            report.sections.append(item.description)
        elif isinstance(item, Skipped):
            report.skip(item.source_id, item.title, item.reason)
        elif outcome[id(item)]:
            conversation = item.conversation
            report.imported.append(
                {
                    "id": conversation["id"],
                    "title": conversation["title"],
                    "messages": len(conversation["messages"]),
                    "source_id": item.source_id,
                }
            )
            report.dropped.update(item.dropped)
        else:
            report.skip(item.source_id, item.conversation["title"], ALREADY_IMPORTED)


# --- the upload ---------------------------------------------------------------------------------


class Upload:
    """The request body, or its multipart field `file`, written to a file as it arrives."""

    def __init__(self, target: Path, content_type: str | None) -> None:
        media, options = parse_options_header(content_type)
        self.sink = open(target, "xb")  # noqa: SIM115 - closed by close()
        self.found_file = False
        self.filename = "the upload"
        self._header: list[bytes] = [b"", b""]
        self._in_file = False
        self.parser: MultipartParser | None = None
        if media == b"multipart/form-data":
            boundary = options.get(b"boundary", b"")
            try:
                if not boundary:
                    raise FormParserError("no boundary in the Content-Type")
                self.parser = MultipartParser(boundary, self.callbacks())
            except FormParserError as exc:
                self.sink.close()
                raise UnknownFormat(
                    f"the multipart form cannot be read ({exc}); send it as -F file=@export.zip"
                ) from None

    def callbacks(self) -> MultipartCallbacks:
        def on_header_field(data: bytes, start: int, end: int) -> None:
            self._header[0] += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            self._header[1] += data[start:end]

        def on_header_end() -> None:
            name, value = self._header
            if name.strip().lower() == b"content-disposition":
                options = parse_options_header(value)[1]
                self._in_file = options.get(b"name") == b"file" and not self.found_file
                if self._in_file:
                    self.filename = display_name(options.get(b"filename", b""))
                self.found_file = self.found_file or self._in_file
            self._header = [b"", b""]

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if self._in_file:
                self.sink.write(data[start:end])

        def on_part_end() -> None:
            self._in_file = False

        return {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        }

    def write(self, data: bytes) -> None:
        try:
            if self.parser is None:
                self.sink.write(data)
            else:
                self.parser.write(data)
        except FormParserError as exc:
            raise UnknownFormat(
                f"the multipart form could not be read ({first_line(exc)}); send it as -F file=@export.zip"
            ) from None

    def finish(self) -> int:
        """Flush the file; its size. A form without a `file` field is refused."""
        if self.parser is not None:
            try:
                self.parser.finalize()
            except FormParserError as exc:
                raise UnknownFormat(f"the multipart form is cut off ({first_line(exc)})") from None
            if not self.found_file:
                raise NothingToImport(
                    "found a form without a field named 'file'; send the export as -F file=@export.zip"
                )
        self.sink.flush()
        return self.sink.tell()

    def close(self) -> None:
        self.sink.close()


def display_name(raw: bytes) -> str:
    """The uploaded file's name as given (for messages only; never a path)."""
    name = raw.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:100]
    return name or "the upload"


async def receive_upload(request: Request, target: Path, limit: int) -> str:
    """Stream the body to `target` in chunks, never holding it in memory; the name of the file sent."""
    upload = await anyio.to_thread.run_sync(Upload, target, request.headers.get("content-type"))
    try:
        received = 0
        pending = bytearray()
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise UploadTooLarge(
                    f"request body is too large; the limit is {limit} bytes (CHAT_MAX_IMPORT_BYTES)"
                )
            pending += chunk
            if len(pending) >= UPLOAD_CHUNK:
                await anyio.to_thread.run_sync(upload.write, bytes(pending))
                pending.clear()
        await anyio.to_thread.run_sync(upload.write, bytes(pending))
        size = await anyio.to_thread.run_sync(upload.finish)
    finally:
        await anyio.to_thread.run_sync(upload.close)
    if size == 0:
        raise NothingToImport(
            "the request has no file: send the export as the body, or as -F file=@export.zip"
        )
    return upload.filename


def make_workdir(data_dir: Path) -> Path:
    """A private folder for one upload, beside the conversations; ones left by a crash are removed."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cutoff = time.time() - STALE_WORKDIR_SECONDS
    for old in data_dir.glob(".import-*"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old)
    workdir = data_dir / f".import-{secrets.token_hex(8)}"
    workdir.mkdir(mode=0o700)
    return workdir


# --- the route ----------------------------------------------------------------------------------


class ImportedOut(BaseModel):
    id: str
    title: str | None
    messages: int
    source_id: str


class SkippedOut(BaseModel):
    source_id: str | None
    title: str | None
    reason: str


class ImportReportOut(BaseModel):
    imported: list[ImportedOut]
    skipped: list[SkippedOut]
    dropped: dict[str, int]


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "The export: a multipart form with the field `file`, or the file itself as the body.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

router = APIRouter(tags=["import"])


@router.post(IMPORT_PATH, response_model=ImportReportOut, openapi_extra=UPLOAD_BODY)
async def import_conversations(request: Request, store: StoreDep) -> Response:
    """Import a ChatGPT, Claude.ai or own export (zip or JSON); answers what was imported and skipped."""
    limit: int = request.app.state.settings.max_import_bytes
    workdir = await anyio.to_thread.run_sync(make_workdir, store.data_dir)
    try:
        upload = workdir / "upload"
        name = await receive_upload(request, upload, limit)
        model = request.app.state.default_model
        report = await import_export(store, upload, limit=limit, fallback_model=model, name=name)
    except ImportRefused as exc:
        return error(exc.status_code, exc.detail, exc.type, **exc.extra)
    except ClientDisconnect:
        return Response(status_code=499)  # the client is gone mid-upload; nobody reads this
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, workdir, True)
    return JSON(report.as_dict())


# --- the command line ---------------------------------------------------------------------------

USAGE = """usage: python main.py import [--json] FILE...

Imports exports into CHAT_DATA_DIR (no server needed; it may run meanwhile):
a ChatGPT export (the zip, conversations.json or conversations-NNN.json), a Claude.ai export
(the zip or conversations.json), or a zip or conversation file exported by this service.
A folder is read like a zip. --json prints each file's report as JSON."""


def run_cli(args: list[str], data_dir: Path, limit: int, fallback_model: str) -> int:
    """`python main.py import [--json] FILE...`: the exit status (0 all imported, 1 a file refused)."""
    as_json = "--json" in args
    paths = [Path(a) for a in args if a != "--json"]
    if not paths or any(a in ("-h", "--help") for a in args):
        print(USAGE, file=sys.stderr)
        return 2
    store = Store(data_dir)
    store.open()
    return asyncio.run(import_paths(store, paths, limit, fallback_model, as_json))


async def import_paths(
    store: Store, paths: Iterable[Path], limit: int, fallback_model: str, as_json: bool
) -> int:
    status = 0
    for path in paths:
        if not path.exists():
            print(f"{path}: no such file or folder", file=sys.stderr)
            status = 1
            continue
        try:
            report = await import_export(store, path, limit=limit, fallback_model=fallback_model)
        except ImportRefused as exc:
            print(f"{path}: {exc.detail}", file=sys.stderr)
            status = 1
            continue
        if as_json:
            print(orjson.dumps(report.as_dict()).decode())
            continue
        print(f"{path}: {report.summary()}")
        for skipped in report.skipped:
            if skipped["reason"] != ALREADY_IMPORTED:
                print(f"  skipped {skipped['title'] or skipped['source_id']}: {skipped['reason']}")
    return status
