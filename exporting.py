"""Export: one conversation, or all of them as a zip, as JSON (lossless) or Markdown (readable).

A conversation's JSON export is its file's content, byte for byte (every branch, every field), so
that importing it gives back the same conversation. The zip of every conversation holds
`conversations/<id>.json`, the layout the importer reads back. Markdown is the current branch, with
the model of each reply and the date. The zip is written while it is sent, one conversation at a
time, by the standard library's `zipfile` writing to a stream it cannot seek (it then puts each
entry's sizes after its data): memory stays that of one conversation, whatever their number.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

import anyio.to_thread
from fastapi import APIRouter, Query
from starlette.responses import Response, StreamingResponse

from storage import (
    FILE_RE,
    Conversation,
    ConversationNotFound,
    StorageError,
    Store,
    current_branch,
    is_valid_id,
    parse_conversation,
    reading,
)
from web import StoreDep

Format = Literal["json", "markdown"]
FormatQuery = Annotated[Format, Query(description="`json` (lossless, every branch) or `markdown` (readable)")]
UNSAFE_IN_NAMES = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')

router = APIRouter(tags=["export"])


def download(description: str, *media_types: str) -> dict[str, Any]:
    """OpenAPI for a 200 that is a download of one of these types."""

    def schema(media_type: str) -> dict[str, Any]:
        return (
            {"type": "object"} if media_type == "application/json" else {"type": "string", "format": "binary"}
        )

    return {"description": description, "content": {m: {"schema": schema(m)} for m in media_types}}


# --- formats ------------------------------------------------------------------------------------


def to_markdown(conversation: Conversation) -> str:
    """The current branch as Markdown: a heading per message with its author, model and date."""
    lines = [f"# {one_line(conversation['title'] or 'Untitled conversation')}", ""]
    lines += [f"- Model: {conversation['model']}", f"- Created: {day_and_time(conversation['created_at'])}"]
    lines += [f"- Updated: {day_and_time(conversation['updated_at'])}", f"- Id: {conversation['id']}", ""]
    if conversation["system"]:
        lines += ["## System prompt", "", conversation["system"], ""]
    for message in current_branch(conversation):
        when = day_and_time(message["created_at"])
        if message["role"] == "user":
            lines.append(f"## User · {when}")
        else:
            lines.append(f"## Assistant ({message.get('model', conversation['model'])}) · {when}")
        status = message.get("status")
        if status in ("incomplete", "error"):
            lines += ["", f"_(reply {status}{reason(message)})_"]
        lines += ["", message["content"], ""]
    return "\n".join(lines)


def reason(message: object) -> str:
    error = message.get("error") if isinstance(message, dict) else None
    return f": {error['message']}" if isinstance(error, dict) and error.get("message") else ""


def one_line(text: str) -> str:
    return " ".join(text.split())


def day_and_time(stamp: str) -> str:
    """`2026-11-24T05:31:52.126057Z` -> `2026-11-24 05:31 UTC` (as stored if it does not parse)."""
    try:
        return (
            datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            .astimezone(UTC)
            .strftime("%Y-%m-%d %H:%M UTC")
        )
    except ValueError:
        return stamp


def file_name(conversation: Conversation, extension: str) -> str:
    """A name safe on every file system, for any title: `<title> - <first 8 of id>.<ext>`."""
    title = UNSAFE_IN_NAMES.sub(" ", one_line(conversation["title"] or "conversation"))
    title = one_line(title).strip(" .")[:80] or "conversation"
    return f"{title} - {conversation['id'][:8]}.{extension}"


def attachment(name: str) -> str:
    """Content-Disposition for any name: an ASCII fallback and the exact name as RFC 5987 UTF-8."""
    fallback = name.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_").replace("\\", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


# --- one conversation ---------------------------------------------------------------------------


def read_raw(store: Store, conversation_id: str) -> tuple[bytes, Conversation]:
    """The file's bytes and what they parse to (refused as 409 if they do not). Blocking."""
    if not is_valid_id(conversation_id):
        raise ConversationNotFound(
            f"no conversation {conversation_id!r}: ids are 32 lowercase hex characters"
        )
    with reading(conversation_id):
        data = (store.conversations / f"{conversation_id}.json").read_bytes()
    return data, parse_conversation(data, conversation_id)


@router.get(
    "/api/conversations/{conversation_id}/export",
    response_class=Response,
    responses={200: download("the file as stored, or Markdown", "application/json", "text/markdown")},
)
async def export_conversation(
    conversation_id: str, store: StoreDep, format: FormatQuery = "json"
) -> Response:
    """Download one conversation: its file as stored (every branch), or its current branch as Markdown."""
    data, conversation = await anyio.to_thread.run_sync(read_raw, store, conversation_id)
    if format == "json":
        body, media_type, name = data, "application/json", file_name(conversation, "json")
    else:
        body = to_markdown(conversation).encode()
        media_type, name = "text/markdown; charset=utf-8", file_name(conversation, "md")
    return Response(body, media_type=media_type, headers={"Content-Disposition": attachment(name)})


# --- every conversation -------------------------------------------------------------------------


class Chunks:
    """A write-only stream zipfile writes into; `take()` hands over what was written so far."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def zip_entries(store: Store, format: Format) -> Iterator[tuple[str, bytes]]:
    """(name in the zip, content) for every readable conversation; unreadable files are skipped."""
    with os.scandir(store.conversations) as entries:
        ids = sorted(m.group(1) for e in entries if (m := FILE_RE.fullmatch(e.name)) is not None)
    for conversation_id in ids:
        try:
            data, conversation = read_raw(store, conversation_id)
        except StorageError:  # deleted meanwhile, or unreadable (listed in /api/health)
            continue
        if format == "json":
            yield f"conversations/{conversation_id}.json", data
        else:
            yield f"conversations/{file_name(conversation, 'md')}", to_markdown(conversation).encode()


def zip_stream(store: Store, format: Format) -> Iterator[bytes]:
    """The zip, a conversation at a time (a sync generator: Starlette runs it in a worker thread)."""
    sink = Chunks()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in zip_entries(store, format):
            stamp = datetime.now(UTC).timetuple()[:6]
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o600 << 16
            with archive.open(info, "w", force_zip64=True) as entry:
                entry.write(content)
            if chunk := sink.take():
                yield chunk
    yield sink.take()  # the central directory, written when the archive closes


@router.get(
    "/api/export",
    response_class=StreamingResponse,
    responses={200: download("a zip of every conversation", "application/zip")},
)
async def export_all(store: StoreDep, format: FormatQuery = "json") -> Response:
    """Download every conversation as a zip: `conversations/<id>.json` files (lossless) or Markdown."""
    name = f"conversations-{format}-{datetime.now(UTC):%Y-%m-%d}.zip"
    return StreamingResponse(
        zip_stream(store, format),
        media_type="application/zip",
        headers={"Content-Disposition": attachment(name)},
    )
