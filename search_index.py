"""The derived index: listing summaries and full-text search in one SQLite file, `data/index.sqlite3`.

The conversation files stay the only truth. This database holds what is derived from them and is
rebuilt by itself when it is missing, corrupt or of another `INDEX_VERSION`: deleting it loses
nothing. Every `Store` write updates it after the file is durably replaced (`written`, `deleted`);
changes made behind its back (by hand, a restore, a process whose update failed) are found by a
reconcile: file by file, (inode, size, mtime_ns) against what the index recorded. A request runs
one when `conversations/` changed since the last look (at most one look a second); a full reconcile
runs at start and every 10 minutes, and is also how the index is first built.

Tables: `conversations` (one summary per file, or the reason it is unreadable), `docs` (one row per
searchable text: a title, or a message of any branch), `words` (FTS5, unicode61 without diacritics)
and `grams` (FTS5 trigram, only for texts holding Chinese, Japanese or Korean, which unicode61 does
not split into words).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import re
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from storage import (
    FILE_RE,
    Conversation,
    InvalidCursor,
    StorageError,
    Summary,
    decode_cursor,
    encode_cursor,
    parse_conversation,
    summarize,
)
from web import JSON, error

INDEX_VERSION = 1
CHECK_INTERVAL = 1.0  # seconds between two looks at conversations/ from requests
FULL_RECONCILE_INTERVAL = 600.0
BATCH = 100  # files read, then written in one short transaction: writers wait at most for one batch
MAX_TERMS = 16
RANKED_MAX = 5000
RACY_NS = 2_000_000_000
RETRY_AFTER = "5"
OPEN, CLOSE = "\x02", "\x03"  # highlight markers; removed from indexed text so they are unambiguous
SNIPPET_BEFORE, SNIPPET_LENGTH = 60, 240

log = logging.getLogger("chat.index")

# Hangul, CJK radicals and punctuation, kana, Han (with extensions and compatibility), half-width kana
CJK = (
    "\u1100-\u11ff\u2e80-\u2fdf\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0002ffff"
)
CJK_RE = re.compile(f"[{CJK}]")
WORD_CHAR_RE = re.compile(r"[^\W_]")
QUERY_RE = re.compile(r'"([^"]*)"?|([^\s"]+)')
CONTROL_RE = re.compile("[\x00-\x1f\x7f]")  # a NUL ends an FTS5 string early; the markers are ours

SCHEMA = f"""
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE conversations(
    id TEXT PRIMARY KEY,
    updated_at TEXT NOT NULL,
    title TEXT,
    summary TEXT,
    problem TEXT,
    ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL
);
CREATE INDEX conversations_by_update ON conversations(updated_at, id) WHERE problem IS NULL;
CREATE TABLE docs(
    rowid INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    message_id TEXT,
    role TEXT,
    created_at TEXT NOT NULL,
    digest INTEGER NOT NULL
);
CREATE INDEX docs_by_conversation ON docs(conversation_id);
CREATE VIRTUAL TABLE titles USING fts5(text, tokenize='unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE words USING fts5(text, tokenize='unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE grams USING fts5(text, tokenize='trigram');
PRAGMA user_version = {INDEX_VERSION};
"""

Signature = tuple[int, int, int]
Page = tuple[list[Summary], str | None]
Doc = tuple[str | None, str | None, str, str]  # message id (None: the title), role, created_at, text


class IndexBuilding(StorageError):
    status_code = 503
    type = "index_building"


class InvalidQuery(StorageError):
    status_code = 400
    type = "invalid_query"


def signature(stat: os.stat_result) -> Signature:
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class Loaded:
    """One file as a reconcile read it: its signature, and its conversation or why it is unreadable."""

    conversation_id: str
    signature: Signature
    conversation: Conversation | None
    problem: str | None


# --- queries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query_:
    """A user's query compiled to the index: FTS5 expressions and substrings, all AND-ed."""

    words: str  # FTS5 expression over `words` ("" if none)
    grams: str  # FTS5 expression over `grams` (CJK substrings of 3+ characters)
    scans: tuple[str, ...]  # CJK substrings of 1-2 characters: instr() over `grams`
    highlights: tuple[str, ...]  # CJK substrings, highlighted in Python


def fts_string(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def compile_query(q: str, *, prefix_words: bool = False) -> Query_:
    """Words AND-ed, "quoted phrases", word* prefixes; anything else typed is text, never syntax."""
    words: list[str] = []
    grams: list[str] = []
    scans: list[str] = []
    for match in QUERY_RE.finditer(CONTROL_RE.sub(" ", q)):
        phrase, bare = match.group(1), match.group(2)
        text = " ".join((phrase if phrase is not None else bare).split())
        prefix = bare is not None and (bare.endswith("*") or prefix_words)
        text = text.rstrip("*") if bare is not None else text
        if CJK_RE.search(text):
            (grams if len(text) >= 3 else scans).append(text)
        elif WORD_CHAR_RE.search(text):
            words.append(fts_string(text) + (" *" if prefix else ""))
    if not (words or grams or scans):
        raise InvalidQuery("the query has no letters or digits to search for; type a word")
    if len(words) + len(grams) + len(scans) > MAX_TERMS:
        raise InvalidQuery(f"the query has more than {MAX_TERMS} words; leave some out")
    return Query_(" ".join(words), " ".join(fts_string(g) for g in grams), tuple(scans), (*grams, *scans))


def matching(query: Query_, table: str) -> tuple[str, list[Any], str]:
    """SQL selecting the rowids of matching texts in `table` ("titles" or "words": which texts to
    search), its parameters, and the ORDER BY that ranks them (best first, ties newest first)."""
    kind = "d.message_id IS NULL" if table == "titles" else "d.message_id IS NOT NULL"
    conditions: list[str] = []
    params: list[Any] = []
    if query.words:
        sql, order = f"SELECT rowid FROM {table} WHERE {table} MATCH ?", f"ORDER BY bm25({table}), rowid DESC"
        params.append(query.words)
        if query.grams:
            conditions.append("rowid IN (SELECT rowid FROM grams WHERE grams MATCH ?)")
            params.append(query.grams)
        scans = query.scans
    elif query.grams:  # only Chinese/Japanese/Korean: few texts, so the join to docs is cheap
        sql = "SELECT grams.rowid FROM grams JOIN docs d ON d.rowid = grams.rowid "
        sql += f"WHERE grams MATCH ? AND {kind}"
        order = "ORDER BY bm25(grams), d.created_at DESC"
        params.append(query.grams)
        scans = query.scans
    else:
        sql = (
            "SELECT grams.rowid FROM grams JOIN docs d ON d.rowid = grams.rowid "
            f"WHERE instr(lower(grams.text), ?) AND {kind}"
        )
        order = "ORDER BY d.created_at DESC"
        params.append(query.scans[0].lower())
        scans = query.scans[1:]
    for scan in scans:
        conditions.append("rowid IN (SELECT rowid FROM grams WHERE instr(lower(text), ?))")
        params.append(scan.lower())
    if conditions and not query.words:
        conditions = [c.replace("rowid IN", "grams.rowid IN", 1) for c in conditions]
    return " AND ".join([sql, *conditions]), params, order


def encode_search_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"search:{offset}".encode()).decode().rstrip("=")


def decode_search_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    kind, _, offset = raw.partition(":")
    if kind != "search" or not offset.isdigit() or len(offset) > 9:
        raise InvalidCursor("cursor is not valid: pass the next_cursor of a previous page unchanged")
    return int(offset)


# --- snippets -----------------------------------------------------------------------------------


Segment = dict[str, Any]


def segments(highlighted: str, substrings: Sequence[str]) -> list[Segment]:
    """Text with OPEN/CLOSE markers (and CJK substrings to find) as [{"text", "match"}, ...]."""
    parts: list[tuple[str, bool]] = []
    for position, piece in enumerate(re.split(f"[{OPEN}{CLOSE}]", highlighted)):
        matched = position % 2 == 1
        if matched or not substrings:
            parts.append((piece, matched))
            continue
        pattern = "|".join(re.escape(s) for s in sorted(substrings, key=len, reverse=True))
        for sub_position, sub in enumerate(re.split(f"({pattern})", piece, flags=re.IGNORECASE)):
            parts.append((sub, sub_position % 2 == 1))
    merged: list[Segment] = []
    for text, matched in parts:
        if not text:
            continue
        if merged and merged[-1]["match"] == matched:
            merged[-1]["text"] += text
        else:
            merged.append({"text": text, "match": matched})
    return merged


def window(parts: list[Segment]) -> list[Segment]:
    """About SNIPPET_LENGTH characters around the first match, cut at spaces, with … at the cuts."""
    first = next((i for i, p in enumerate(parts) if p["match"]), None)
    out: list[Segment] = []
    if first is not None and first > 0:
        before = parts[first - 1]["text"]
        if len(before) > SNIPPET_BEFORE:
            cut = before[-SNIPPET_BEFORE:]
            cut = cut[cut.find(" ") + 1 :] if " " in cut[:-1] else cut
            before = "…" + cut
        out.append({"text": before, "match": False})
    budget = SNIPPET_LENGTH
    for part in parts[first or 0 :]:
        text = part["text"]
        if len(text) > budget and not part["match"]:
            cut = text[:budget]
            text = (cut[: cut.rfind(" ")] if " " in cut else cut).rstrip() + "…"
            out.append({"text": text, "match": False})
            break
        out.append({"text": text, "match": part["match"]})
        budget -= len(text)
        if budget <= 0:
            break
    return out


def marks(values: Sequence[Any]) -> str:
    """`?, ?, ?`: one SQL placeholder per value."""
    return ",".join("?" * len(values))


def clean(text: str) -> str:
    return text.replace(OPEN, " ").replace(CLOSE, " ").replace("\x00", " ")


# --- the index ----------------------------------------------------------------------------------


class SearchIndex:
    """The index of one data directory, shared by every process that serves it (WAL mode).

    Thread-safe: connections come from a small pool, one per worker thread at a time.
    """

    def __init__(self, data_dir: Path, busy_timeout: float = 5.0) -> None:
        self.data_dir = data_dir
        self.busy_timeout = busy_timeout
        self.conversations = data_dir / "conversations"
        self.path = data_dir / "index.sqlite3"
        self.check_interval = CHECK_INTERVAL
        self._pool: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._generation = 0
        self._inode: int | None = None  # the database file this process opened
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen_mtime = -1  # conversations/'s mtime_ns when the last reconcile started
        self._checked_at = -CHECK_INTERVAL
        self._dirty = False  # an update failed: reconcile at the next look
        self._damaged = False  # SQLite found the database corrupt: start a new one at the next look
        self._building = True  # the first build has not finished
        self._reconciling: asyncio.Lock | None = None
        self._stop = threading.Event()

    # --- opening ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the database, or create it (empty, `building`) when missing, corrupt or outdated.

        Blocking: start-up only (and after the database vanished). With no conversation file at all,
        a new index is ready at once.
        """
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._damaged:
            self._delete()
        try:
            self._open_or_create()
        except sqlite3.DatabaseError as exc:
            log.warning("the index %s is unusable (%s): rebuilding it from the files", self.path, exc)
            self._delete()
            self._open_or_create()

    def _delete(self) -> None:
        self._close_all()
        self._damaged = False
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")

    def _open_or_create(self) -> None:
        self._close_all()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        with self._connection() as db:
            db.execute("PRAGMA journal_mode = WAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != INDEX_VERSION:
                self._create(db, version)
            else:
                db.execute("SELECT count(*) FROM meta").fetchone()
        self._inode = os.stat(self.path).st_ino
        self._seen_mtime = -1
        self._building = self.building()

    def _create(self, db: sqlite3.Connection, version: int) -> None:
        if version:
            log.info("the index has version %d, this service uses %d: rebuilding it", version, INDEX_VERSION)
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] == INDEX_VERSION:
                db.execute("ROLLBACK")  # another process created it meanwhile
                return
            names = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            for (name,) in names:
                if name in ("meta", "conversations", "docs", "titles", "words", "grams"):
                    db.execute(f"DROP TABLE IF EXISTS {name}")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            names = os.listdir(self.conversations) if self.conversations.is_dir() else []
            empty = not any(FILE_RE.fullmatch(name) for name in names)
            db.execute("INSERT INTO meta VALUES ('state', ?)", ("ready" if empty else "building",))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            generation = self._generation
            db = self._pool.pop() if self._pool else None
        if db is None:
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout
            )
            db.execute(
                "PRAGMA synchronous = NORMAL"
            )  # derived data: a lost commit is repaired by a reconcile
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            with self._pool_lock:
                if generation == self._generation and len(self._pool) < 8:
                    self._pool.append(db)
                    db = None
            if db is not None:
                db.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")

    def _close_all(self) -> None:
        with self._pool_lock:
            self._generation += 1
            pool, self._pool = self._pool, []
        for db in pool:
            db.close()

    def close(self) -> None:
        self._stop.set()
        self._close_all()

    # --- the Store's hooks (called under the conversation's locks, after the file is replaced) ---

    def written(self, conversation: Conversation, stat: os.stat_result) -> None:
        loaded = Loaded(conversation["id"], signature(stat), conversation, None)
        self._update(lambda db: self._put(db, loaded))

    def deleted(self, conversation_id: str) -> None:
        self._update(lambda db: self._remove(db, conversation_id))

    def _update(self, change: Any) -> None:
        try:
            with self._writing() as db:
                change(db)
        except sqlite3.Error as exc:
            self._dirty = True  # the file is the truth: the next reconcile repairs the index
            log.warning("could not update the index (%s); the next reconcile repairs it", exc)

    # --- writing rows ----------------------------------------------------------------------------

    def _put(self, db: sqlite3.Connection, loaded: Loaded) -> None:
        conversation = loaded.conversation
        if conversation is None:
            db.execute(
                "INSERT OR REPLACE INTO conversations VALUES (?, '', NULL, NULL, ?, ?, ?, ?)",
                (loaded.conversation_id, loaded.problem, *loaded.signature),
            )
            self._put_docs(db, loaded.conversation_id, [])
            return
        summary = summarize(conversation)
        db.execute(
            "INSERT OR REPLACE INTO conversations VALUES (?, ?, ?, ?, NULL, ?, ?, ?)",
            (
                summary["id"],
                summary["updated_at"],
                summary["title"],
                orjson.dumps(summary),
                *loaded.signature,
            ),
        )
        wanted: list[Doc] = []
        if conversation["title"]:
            wanted.append((None, None, conversation["updated_at"], conversation["title"]))
        for message in conversation["messages"]:
            if message["content"]:
                wanted.append((message["id"], message["role"], message["created_at"], message["content"]))
        self._put_docs(db, summary["id"], wanted)

    def _put_docs(
        self,
        db: sqlite3.Connection,
        conversation_id: str,
        wanted: list[tuple[str | None, str | None, str, str]],
    ) -> None:
        """Make the conversation's docs these; only texts that changed touch the full-text tables."""
        existing = {
            message_id or "": (rowid, digest, created_at)
            for rowid, message_id, digest, created_at in db.execute(
                "SELECT rowid, message_id, digest, created_at FROM docs WHERE conversation_id = ?",
                (conversation_id,),
            )
        }
        for message_id, role, created_at, text in wanted:
            digest = zlib.crc32(f"{role}\0{text}".encode(errors="surrogatepass"))
            old = existing.pop(message_id or "", None)
            if old is not None and old[1] == digest:
                if old[2] != created_at:
                    db.execute("UPDATE docs SET created_at = ? WHERE rowid = ?", (created_at, old[0]))
                continue
            if old is not None:
                self._remove_doc(db, old[0])
            rowid = db.execute(
                "INSERT INTO docs(conversation_id, message_id, role, created_at, digest) "
                "VALUES (?, ?, ?, ?, ?)",
                (conversation_id, message_id, role, created_at, digest),
            ).lastrowid
            table = "words" if message_id is not None else "titles"
            db.execute(f"INSERT INTO {table}(rowid, text) VALUES (?, ?)", (rowid, clean(text)))
            if CJK_RE.search(text):
                db.execute("INSERT INTO grams(rowid, text) VALUES (?, ?)", (rowid, clean(text)))
        for rowid, _, _ in existing.values():
            self._remove_doc(db, rowid)

    def _remove_doc(self, db: sqlite3.Connection, rowid: int) -> None:
        db.execute("DELETE FROM words WHERE rowid = ?", (rowid,))
        db.execute("DELETE FROM titles WHERE rowid = ?", (rowid,))
        db.execute("DELETE FROM grams WHERE rowid = ?", (rowid,))
        db.execute("DELETE FROM docs WHERE rowid = ?", (rowid,))

    def _remove(self, db: sqlite3.Connection, conversation_id: str) -> None:
        self._put_docs(db, conversation_id, [])
        db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # --- reconciling -----------------------------------------------------------------------------

    def reconcile(self, full: bool = True) -> int:
        """Bring the index in line with the files; returns how many files it (re)indexed or dropped.

        A full reconcile compares each file's (inode, size, mtime_ns) with what the index recorded;
        a quick one (after conversations/ changed) compares inodes only, which the directory listing
        gives without a stat per file: a file replaced by a rename always has a new inode, and a file
        edited in place does not change the directory either, so only a full reconcile can see it.
        Blocking. Safe beside writers in any process: a row that changed since this reconcile read
        the index is left alone (its writer was newer).
        """
        self._dirty = False
        mtime = os.stat(self.conversations).st_mtime_ns
        # A directory changed within the clock's granularity of this scan may change again unseen
        # with the same mtime (racy-git): look at it again next time.
        self._seen_mtime = mtime if time.time_ns() - mtime > RACY_NS else -1
        with self._connection() as db:
            known: dict[str, Signature] = {
                row[0]: (row[1], row[2], row[3])
                for row in db.execute("SELECT id, ino, size, mtime_ns FROM conversations")
            }
        on_disk: dict[str, Signature] = {}
        with os.scandir(self.conversations) as entries:
            for entry in entries:
                match = FILE_RE.fullmatch(entry.name)
                if match is None:
                    continue
                cid = match.group(1)
                old = known.get(cid)
                if not full and old is not None and old[0] == entry.inode():
                    on_disk[cid] = old
                    continue
                with contextlib.suppress(FileNotFoundError):
                    on_disk[cid] = signature(entry.stat())
        changed = sorted(
            (cid for cid, sig in on_disk.items() if known.get(cid) != sig), key=lambda c: on_disk[c][2]
        )
        removed = [cid for cid in known if cid not in on_disk]
        for start in range(0, len(changed), BATCH):
            if self._stop.is_set():
                return start
            batch = [self._load(cid) for cid in changed[start : start + BATCH]]
            with self._writing() as db:
                for loaded in batch:
                    if loaded is not None and self._unchanged(db, loaded.conversation_id, known):
                        self._put(db, loaded)
        with self._writing() as db:
            for cid in removed:
                if self._unchanged(db, cid, known):
                    self._remove(db, cid)
            db.execute("UPDATE meta SET value = 'ready' WHERE key = 'state' AND value != 'ready'")
        self._building = False
        self._checked_at = time.monotonic()
        if changed or removed:
            log.info("index: %d files (re)indexed, %d removed", len(changed), len(removed))
        return len(changed) + len(removed)

    def _unchanged(self, db: sqlite3.Connection, conversation_id: str, known: dict[str, Signature]) -> bool:
        row = db.execute(
            "SELECT ino, size, mtime_ns FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        return (tuple(row) if row is not None else None) == known.get(conversation_id)

    def _load(self, conversation_id: str) -> Loaded | None:
        try:
            with open(self.conversations / f"{conversation_id}.json", "rb") as f:
                sig = signature(os.fstat(f.fileno()))
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return Loaded(conversation_id, (0, 0, 0), None, f"could not be read: {exc.strerror}")
        try:
            return Loaded(conversation_id, sig, parse_conversation(data, conversation_id), None)
        except StorageError as exc:
            log.warning("skipping unreadable conversation %s: %s", conversation_id, exc.detail)
            return Loaded(conversation_id, sig, None, exc.detail)

    def reopen_if_gone(self) -> bool:
        """Open a new database if ours was deleted or replaced behind our back. Blocking."""
        try:
            inode: int | None = os.stat(self.path).st_ino
        except FileNotFoundError:
            inode = None
        if inode == self._inode:
            return False
        log.warning("the index %s was removed, replaced or damaged: rebuilding it", self.path)
        self.open()
        return True

    def reconcile_if_moved(self) -> None:
        """Reconcile if conversations/ changed since the last look (or an update failed). Blocking."""
        if self._dirty:
            self.reconcile()
        elif os.stat(self.conversations).st_mtime_ns != self._seen_mtime:
            self.reconcile(full=False)

    # --- async entry points ----------------------------------------------------------------------

    def _lock(self) -> asyncio.Lock:
        if self._reconciling is None:
            self._reconciling = asyncio.Lock()
        return self._reconciling

    async def refresh(self) -> None:
        """At most once a second: look at conversations/ and reconcile if it changed.

        A request waits for a reconcile in progress (the one at start-up may repair what a crash
        left), except during a build (`keep_fresh`, or the task started when the database vanished):
        then it reads what is indexed so far.
        """
        lock = self._lock()
        if self._building:  # a task of its own builds the index
            return
        if not lock.locked() and time.monotonic() - self._checked_at < self.check_interval:
            return
        async with lock:
            if time.monotonic() - self._checked_at < self.check_interval:
                return  # looked at while we waited
            self._checked_at = time.monotonic()
            if await anyio.to_thread.run_sync(self._guarded, self.reopen_if_gone):
                task = asyncio.create_task(self._full_reconcile())  # a build: nobody waits for it
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                await anyio.to_thread.run_sync(self._guarded, self.reconcile_if_moved)

    async def keep_fresh(self) -> None:
        """The lifespan's task: a full reconcile at start and every 10 minutes."""
        while True:
            await self._full_reconcile()
            await asyncio.sleep(FULL_RECONCILE_INTERVAL)

    async def _full_reconcile(self) -> None:
        async with self._lock():
            await anyio.to_thread.run_sync(self._guarded, self.reconcile)

    def _guarded(self, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                log.warning("index reconcile failed (%s); trying again later", exc)
                self._dirty = True
            else:  # corrupt: start again from the files
                log.warning("the index is damaged (%s): rebuilding it", exc)
                self._damaged, self._inode = True, None
        except OSError as exc:
            log.warning("index reconcile failed (%s); trying again later", exc)
            self._dirty = True
        return False

    async def run(self, work: Any, *args: Any) -> Any:
        """Run a read in a worker thread; a damaged database is rebuilt, the caller told to wait."""
        await self.refresh()
        try:
            return await anyio.to_thread.run_sync(work, *args)
        except sqlite3.OperationalError as exc:
            if "fts5" in str(exc):
                raise InvalidQuery(f"the query could not be searched ({exc}); try plain words") from None
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise  # our bug: a 500 with the traceback in the log
            raise IndexBuilding("the index is busy; try again in a few seconds") from None
        except sqlite3.DatabaseError as exc:
            log.warning("the index is damaged (%s): rebuilding it", exc)
            self._damaged, self._inode = True, None  # the next look rebuilds it
            raise IndexBuilding("the search index is being rebuilt; try again in a few seconds") from None

    # --- reads -----------------------------------------------------------------------------------

    async def page(
        self, limit: int, cursor: str | None, q: str | None = None
    ) -> tuple[list[Summary], str | None]:
        before = decode_cursor(cursor) if cursor else None
        query = compile_query(q, prefix_words=True) if q else None
        result: Page = await self.run(self._page, limit, before, query)
        return result

    def _page(
        self, limit: int, before: tuple[str, str] | None, query: Query_ | None
    ) -> tuple[list[Summary], str | None]:
        sql = "SELECT summary FROM conversations c WHERE problem IS NULL"
        params: list[Any] = []
        if before is not None:
            sql += " AND (updated_at, id) < (?, ?)"
            params += before
        if query is not None:
            titles, match_params, _ = matching(query, "titles")
            sql += f" AND id IN (SELECT conversation_id FROM docs WHERE rowid IN ({titles}))"
            params += match_params
        sql += " ORDER BY updated_at DESC, id DESC LIMIT ?"
        with self._connection() as db:
            rows = db.execute(sql, [*params, limit + 1]).fetchall()
        items: list[Summary] = [orjson.loads(row[0]) for row in rows[:limit]]
        return items, encode_cursor(items[-1]) if len(rows) > limit else None

    async def unreadable(self) -> dict[str, str]:
        """Files the index could not read, with the reason (as of the last reconcile)."""
        try:
            result: dict[str, str] = await anyio.to_thread.run_sync(self._unreadable)
        except sqlite3.Error:
            return {}
        return result

    def _unreadable(self) -> dict[str, str]:
        with self._connection() as db:
            return dict(db.execute("SELECT id, problem FROM conversations WHERE problem IS NOT NULL"))

    def building(self) -> bool:
        with self._connection() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'state'").fetchone()
        return row is None or row[0] != "ready"

    async def search(self, q: str, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
        offset = decode_search_cursor(cursor) if cursor else 0
        query = compile_query(q)
        found: tuple[list[dict[str, Any]], str | None] = await self.run(self._search, query, limit, offset)
        return found

    def _search(self, query: Query_, limit: int, offset: int) -> tuple[list[dict[str, Any]], str | None]:
        if self.building():
            raise IndexBuilding("the search index is still being built; try again in a few seconds")
        with self._connection() as db:
            titles_sql, params, _ = matching(query, "titles")
            title_count = db.execute(f"SELECT count(*) FROM ({titles_sql})", params).fetchone()[0]
            found = []  # (table, rowid), best first: every title match, then messages
            if offset < title_count:
                found += [("titles", r) for r in self._ranked(db, query, "titles", limit + 1, offset)]
            if len(found) <= limit:
                wanted, skip = limit + 1 - len(found), max(0, offset - title_count)
                found += [("words", r) for r in self._ranked(db, query, "words", wanted, skip)]
            page = found[:limit]
            rowids = [rowid for _, rowid in page]
            docs = {
                row[0]: row[1:]
                for row in db.execute(
                    "SELECT rowid, conversation_id, message_id, role, created_at FROM docs "
                    f"WHERE rowid IN ({marks(rowids)})",
                    rowids,
                )
            }
            texts = self._highlighted(db, query, "titles", [r for t, r in page if t == "titles"])
            texts.update(self._highlighted(db, query, "words", [r for t, r in page if t == "words"]))
            ids = sorted({doc[0] for doc in docs.values()})
            titles = dict(db.execute(f"SELECT id, title FROM conversations WHERE id IN ({marks(ids)})", ids))
        items = [
            {
                "conversation_id": conversation_id,
                "conversation_title": titles.get(conversation_id),
                "message_id": message_id,
                "role": role,
                "snippet": window(segments(texts.get(rowid, ""), query.highlights)),
                "created_at": created_at,
            }
            for rowid in rowids
            if rowid in docs
            for conversation_id, message_id, role, created_at in [docs[rowid]]
        ]
        return items, encode_search_cursor(offset + limit) if len(found) > limit else None

    def _ranked(
        self, db: sqlite3.Connection, query: Query_, table: str, limit: int, offset: int
    ) -> list[int]:
        """The rowids of a page of matches in `table`, best first.

        When more than RANKED_MAX texts match, only the RANKED_MAX newest are ranked: ranking costs
        about 10 µs a match, and a word that common says little about relevance anyway.
        """
        sql, params, order = matching(query, table)
        newest = f"{sql} ORDER BY rowid DESC LIMIT 1 OFFSET {RANKED_MAX - 1}" if query.words else None
        floor = db.execute(newest, params).fetchone() if newest else None
        if floor is not None:
            sql, params = f"{sql} AND rowid >= ?", [*params, floor[0]]
        rows = db.execute(f"{sql} {order} LIMIT ? OFFSET ?", [*params, limit, offset]).fetchall()
        return [row[0] for row in rows]

    def _highlighted(
        self, db: sqlite3.Connection, query: Query_, table: str, rowids: list[int]
    ) -> dict[int, str]:
        if not rowids:
            return {}
        # only "?" placeholders and our table names are formatted into these statements
        if query.words:
            sql = (
                f"SELECT rowid, highlight({table}, 0, ?, ?) FROM {table} WHERE {table} MATCH ? AND rowid IN "
            )
            params: list[Any] = [OPEN, CLOSE, query.words, *rowids]
        else:
            sql, params = f"SELECT rowid, text FROM {table} WHERE rowid IN ", list(rowids)
        sql += f"({marks(rowids)})"
        return dict(db.execute(sql, params).fetchall())


# --- routes -------------------------------------------------------------------------------------


async def get_index(request: Request) -> SearchIndex:
    index: SearchIndex = request.app.state.index
    return index


IndexDep = Annotated[SearchIndex, Depends(get_index)]


class SnippetPartOut(BaseModel):
    text: str
    match: bool = Field(description="true for a part the query matched (show it highlighted)")


class SearchHitOut(BaseModel):
    conversation_id: str
    conversation_title: str | None
    message_id: str | None = Field(description="null for a match in the title")
    role: Literal["user", "assistant"] | None
    snippet: list[SnippetPartOut] = Field(description="plain text in parts, never HTML")
    created_at: str


class SearchOut(BaseModel):
    items: list[SearchHitOut]
    next_cursor: str | None


router = APIRouter(tags=["search"])


@router.get("/api/search", response_model=SearchOut)
async def search(
    index: IndexDep,
    q: Annotated[str, Query(min_length=1, max_length=500, pattern=r"\S")],
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """Messages and titles matching every word of `q`, best first, each with a plain-text snippet."""
    try:
        items, next_cursor = await index.search(q, limit, cursor)
    except IndexBuilding as exc:
        return error(503, exc.detail, exc.type, headers={"Retry-After": RETRY_AFTER})
    return JSON({"items": items, "next_cursor": next_cursor})
