"""Storage: atomic durable files, locking across tasks and processes, the listing index, schema."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import storage
from search_index import SearchIndex
from storage import (
    ConversationNotFound,
    ConversationUnreadable,
    Message,
    StorageError,
    StorageFull,
    Store,
)
from tests.conftest import fail_writes_containing

ROOT = Path(__file__).resolve().parent.parent
PARAMS: storage.Params = {"temperature": None, "max_tokens": None}


def opened(data_dir: Path) -> Store:
    store = Store(data_dir)
    store.open()
    return store


def listed(data_dir: Path) -> tuple[list[str], dict[str, str]]:
    """What a restarted service lists (ids, newest first) and reports unreadable (id -> why)."""
    index = SearchIndex(data_dir)
    index.open()
    index.reconcile()
    items, _ = asyncio.run(index.page(50, None))
    unreadable = asyncio.run(index.unreadable())
    index.close()
    return [s["id"] for s in items], unreadable


def placeholder(conversation: storage.Conversation) -> Message:
    return storage.placeholder_reply(conversation["model"], conversation["params"])


async def turn(store: Store, conversation: str | storage.Conversation, text: str, answer: str) -> str:
    record = await store.append_turn(conversation, text, placeholder)
    await store.finish_reply(
        record.conversation_id, {**record.reply, "content": answer, "status": "complete"}
    )
    return record.conversation_id


def new(model: str = "openai/x") -> storage.Conversation:
    return storage.new_conversation(model=model, system=None, params=PARAMS)


# --- files --------------------------------------------------------------------------------------


def test_directories_and_files_are_private(data_dir: Path) -> None:
    store = opened(data_dir)
    conversation_id = asyncio.run(turn(store, new(), "hi", "hello"))
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.conversations.stat().st_mode) == 0o700
    path = store.conversations / f"{conversation_id}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_turn_is_saved_as_valid_json_with_the_documented_fields(data_dir: Path) -> None:
    store = opened(data_dir)
    conversation_id = asyncio.run(turn(store, new(), "What is 2+2?", "4"))
    doc = json.loads((store.conversations / f"{conversation_id}.json").read_text())
    assert doc["schema_version"] == storage.SCHEMA_VERSION
    assert set(doc) == {
        "schema_version", "id", "title", "created_at", "updated_at", "model", "system", "params",
        "current_id", "messages",
    }  # fmt: skip
    user, reply = doc["messages"]
    assert user["role"] == "user" and user["content"] == "What is 2+2?" and user["parent_id"] is None
    assert reply["parent_id"] == user["id"] and reply["content"] == "4" and reply["status"] == "complete"
    assert doc["current_id"] == reply["id"]
    assert doc["title"] == "What is 2+2?"


def test_write_durably_replaces_whole_and_cleans_up_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file.json"
    storage.write_durably(target, b'{"v": 1}')
    assert target.read_bytes() == b'{"v": 1}'

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        storage.write_durably(target, b'{"v": 2}')
    assert target.read_bytes() == b'{"v": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [(errno.ENOSPC, StorageFull), (errno.EIO, StorageError), (errno.EACCES, StorageError)],
)
def test_disk_errors_fail_the_write_and_keep_the_old_file(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, code: int, expected: type[StorageError]
) -> None:
    store = opened(data_dir)
    conversation_id = asyncio.run(turn(store, new(), "first", "one"))
    before = (store.conversations / f"{conversation_id}.json").read_bytes()
    fail_writes_containing(monkeypatch, b'"second"', code)
    with pytest.raises(expected) as raised:
        asyncio.run(turn(store, conversation_id, "second", "two"))
    assert os.strerror(code) in raised.value.detail
    monkeypatch.undo()
    assert (store.conversations / f"{conversation_id}.json").read_bytes() == before
    assert [p.name for p in store.conversations.iterdir() if p.name.endswith(".tmp")] == []
    asyncio.run(turn(store, conversation_id, "third", "three"))  # the store still works


@pytest.mark.parametrize("call", ["fsync", "replace"])
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC, errno.EACCES])
def test_fsync_and_replace_faults_fail_the_write_and_keep_the_old_file(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    store = opened(data_dir)
    conversation_id = asyncio.run(turn(store, new(), "first", "one"))
    path = store.conversations / f"{conversation_id}.json"
    before = path.read_bytes()

    def failing(*args: Any) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, call, failing)
    with pytest.raises(StorageError) as raised:
        asyncio.run(turn(store, conversation_id, "second", "two"))
    assert os.strerror(code) in raised.value.detail
    monkeypatch.undo()
    assert path.read_bytes() == before  # nothing acknowledged that is not on disk
    assert [p.name for p in store.conversations.iterdir() if p.name.endswith(".tmp")] == []
    asyncio.run(turn(store, conversation_id, "third", "three"))


def test_open_survives_a_temp_file_renamed_away_during_the_scan(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = opened(data_dir)
    vanishing = store.conversations / ".abc.json.1234.tmp"
    vanishing.write_bytes(b"{")
    real_scandir = os.scandir

    def scandir_then_rename(path: Any) -> Any:
        entries = list(real_scandir(path))
        vanishing.unlink()  # what another process's os.replace does to its temp file
        return iter(entries)

    monkeypatch.setattr(os, "scandir", scandir_then_rename)
    store.open()  # no FileNotFoundError: a second server process can start while the first writes


def test_stale_temp_files_are_removed_at_open(data_dir: Path) -> None:
    store = opened(data_dir)
    stale = store.conversations / ".abc.json.1234.tmp"
    fresh = store.conversations / ".def.json.5678.tmp"
    stale.write_bytes(b"{")
    fresh.write_bytes(b"{")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    store.open()
    assert not stale.exists()
    assert fresh.exists()  # may belong to another process's write in progress


# --- ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["../secret", "..", "/etc/passwd", "A" * 32, "0" * 31, "0" * 33, "0" * 31 + "/", "", "%2e%2e"]
)
def test_invalid_ids_never_reach_the_file_system(data_dir: Path, bad: str) -> None:
    store = opened(data_dir)
    before = sorted(data_dir.rglob("*"))
    with pytest.raises(ConversationNotFound):
        asyncio.run(store.get(bad))
    with pytest.raises(ConversationNotFound):
        asyncio.run(store.delete(bad))
    assert sorted(data_dir.rglob("*")) == before


# --- concurrency --------------------------------------------------------------------------------


def test_concurrent_turns_in_one_process_all_land(data_dir: Path) -> None:
    store = opened(data_dir)

    async def many() -> str:
        conversation_id = await turn(store, new(), "start", "ok")
        await asyncio.gather(*(turn(store, conversation_id, f"q{i}", f"a{i}") for i in range(40)))
        return conversation_id

    conversation_id = asyncio.run(many())
    conversation = asyncio.run(store.get(conversation_id))
    assert len(conversation["messages"]) == 82
    by_id = {m["id"]: m for m in conversation["messages"]}
    for message in conversation["messages"]:
        if message["role"] == "assistant" and message["content"] != "ok":
            question = by_id[message["parent_id"] or ""]
            assert question["content"] == "q" + message["content"][1:]
    assert [m["content"] for m in storage.current_branch(conversation)][:2] == ["start", "ok"]
    assert len(storage.current_branch(conversation)) == 82


APPENDER = """
import asyncio, sys
sys.path.insert(0, {root!r})
from pathlib import Path
import storage
from tests.test_storage import turn
async def main():
    store = storage.Store(Path({data!r}))
    store.open()
    for i in range({count}):
        await turn(store, {cid!r}, f"{tag}-{{i}}", "ok")
asyncio.run(main())
"""


def test_two_processes_appending_lose_nothing(data_dir: Path) -> None:
    store = opened(data_dir)
    conversation_id = asyncio.run(turn(store, new(), "start", "ok"))
    count = 60
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                APPENDER.format(
                    root=str(ROOT), data=str(data_dir), count=count, cid=conversation_id, tag=tag
                ),
            ]
        )
        for tag in ("p1", "p2")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    conversation = asyncio.run(store.get(conversation_id))
    texts = [m["content"] for m in conversation["messages"] if m["role"] == "user"]
    assert len(texts) == 1 + 2 * count
    assert len(set(texts)) == len(texts)


def test_a_replacement_that_looks_the_same_is_never_lost_to_the_cache(data_dir: Path) -> None:
    """Another writer's file with the same size and mtime, on the very inode ext4 just freed (it
    reuses one at once): the copy this process keeps must not be taken for the file."""
    store = opened(data_dir)
    conversation_id = asyncio.run(turn(store, new(), "hi", "hello"))  # kept: the next change skips a read
    path = store.conversations / f"{conversation_id}.json"
    mine = os.stat(path)
    theirs = path.read_bytes().replace(b'"hello"', b'"HELLO"')  # as another process would write it
    for attempt in range(8):  # each replacement frees an inode for the next temp file
        tmp = path.with_name(f"other-{attempt}.tmp")
        tmp.write_bytes(theirs)
        os.utime(tmp, ns=(mine.st_atime_ns, mine.st_mtime_ns))
        os.replace(tmp, path)
        if os.stat(path).st_ino == mine.st_ino:
            break
    asyncio.run(store.update(conversation_id, {"title": "renamed"}))
    saved = json.loads(path.read_text())
    assert [m["content"] for m in saved["messages"]] == ["hi", "HELLO"]
    assert saved["title"] == "renamed"


def test_the_cache_holds_no_file_open_once_closed(data_dir: Path) -> None:
    store = opened(data_dir)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        asyncio.run(turn(store, new(), "hi", "hello"))
    assert len(os.listdir("/proc/self/fd")) == before + 3
    store.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_corrupt_file_is_reported_skipped_and_left_untouched(data_dir: Path) -> None:
    store = opened(data_dir)
    good = asyncio.run(turn(store, new(), "fine", "ok"))
    broken_id = storage.new_id()
    broken = store.conversations / f"{broken_id}.json"
    broken.write_bytes(b'{"schema_version": 1, "id": "trunc')
    ids, unreadable = listed(data_dir)
    assert ids == [good]
    assert broken_id in unreadable
    fresh = opened(data_dir)
    with pytest.raises(ConversationUnreadable, match="not valid JSON"):
        asyncio.run(fresh.get(broken_id))
    with pytest.raises(ConversationUnreadable):
        asyncio.run(turn(fresh, broken_id, "more", "ok"))
    assert broken.read_bytes() == b'{"schema_version": 1, "id": "trunc'


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc: doc.pop("title"),
        lambda doc: doc.pop("params"),
        lambda doc: doc["messages"][0].pop("parent_id"),
        lambda doc: doc["messages"].append("hello"),
        lambda doc: doc.update(schema_version=0, messages=["hello"]),  # a failing migration
        lambda doc: doc.update(id="0" * 32),
        lambda doc: doc.pop("messages"),  # made every listing a 500 (a KeyError escaped the rescan)
        lambda doc: doc.update(schema_version=True),
        lambda doc: doc.update(schema_version=-1),
        lambda doc: doc.update(current_id=7),
        lambda doc: doc["params"].update(temperature="hot"),
        lambda doc: doc["messages"][0].update(role="system"),
        lambda doc: doc["messages"][1].update(status="done"),
        lambda doc: doc["messages"][1].update(usage={"input_tokens": "many", "output_tokens": 1}),
        lambda doc: doc["messages"][1].update(error={"type": "x"}),
        lambda doc: doc["messages"].__setitem__(0, {}),
    ],
)
def test_a_file_of_the_wrong_shape_is_unreadable_not_a_crash(data_dir: Path, damage: Any) -> None:
    store = opened(data_dir)
    good = asyncio.run(turn(store, new(), "fine", "ok"))
    bad = asyncio.run(turn(store, new(), "soon broken", "ok"))
    path = store.conversations / f"{bad}.json"
    doc = json.loads(path.read_text())
    damage(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ConversationUnreadable, match="repair the file or delete it"):
        asyncio.run(store.get(bad))
    with pytest.raises(ConversationUnreadable):
        asyncio.run(turn(store, bad, "more", "ok"))
    ids, unreadable = listed(data_dir)  # a restart: the index rebuilds from the files
    assert ids == [good]
    assert list(unreadable) == [bad]


def test_a_file_from_a_newer_version_is_refused_not_overwritten(data_dir: Path) -> None:
    store = opened(data_dir)
    conversation_id = asyncio.run(turn(store, new(), "hi", "ok"))
    path = store.conversations / f"{conversation_id}.json"
    doc = json.loads(path.read_text())
    doc["schema_version"] = storage.SCHEMA_VERSION + 1
    path.write_text(json.dumps(doc))
    before = path.read_bytes()
    with pytest.raises(ConversationUnreadable, match="newer version"):
        asyncio.run(store.get(conversation_id))
    with pytest.raises(ConversationUnreadable):
        asyncio.run(store.update(conversation_id, {"title": "x"}))
    assert path.read_bytes() == before


def test_a_file_of_the_wrong_shape_names_what_is_wrong(data_dir: Path) -> None:
    store = opened(data_dir)
    bad = asyncio.run(turn(store, new(), "soon broken", "ok"))
    path = store.conversations / f"{bad}.json"
    doc = json.loads(path.read_text())
    doc["messages"][1]["role"] = "robot"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConversationUnreadable, match=r"messages\.1\.role: Input should be 'user' or"):
        asyncio.run(store.get(bad))


def test_a_version_1_file_is_read_and_written_back_as_version_2(data_dir: Path) -> None:
    store = opened(data_dir)
    conversation_id = asyncio.run(turn(store, new(), "hi", "ok"))
    path = store.conversations / f"{conversation_id}.json"
    doc = json.loads(path.read_text())
    doc["schema_version"] = 1
    path.write_text(json.dumps(doc))
    assert asyncio.run(opened(data_dir).get(conversation_id)) == {**doc, "schema_version": 2}
    asyncio.run(opened(data_dir).update(conversation_id, {"title": "now 2"}))
    assert json.loads(path.read_text())["schema_version"] == storage.SCHEMA_VERSION == 2


def test_a_migrated_file_reads_the_same_every_time(data_dir: Path) -> None:
    conversation_id = storage.new_id()
    legacy = {
        "id": conversation_id,
        "created_at": "2026-01-01T00:00:00.000000Z",
        "updated_at": "2026-01-01T00:00:00.000000Z",
        "model": "openai/gpt-4o-mini",
        "messages": [
            {"role": "user", "content": "same"},
            {"role": "assistant", "content": "same"},
            {"role": "user", "content": "same"},
        ],
    }
    data = json.dumps(legacy).encode()
    first = storage.parse_conversation(data, conversation_id)
    second = storage.parse_conversation(data, conversation_id)
    assert first == second
    ids = [m["id"] for m in first["messages"]]
    assert len(set(ids)) == 3 and all(storage.is_valid_id(i) for i in ids)
    assert first["current_id"] == ids[2]
    other = storage.new_id()  # the same messages in another conversation get other ids
    assert (
        storage.parse_conversation(data.replace(conversation_id.encode(), other.encode()), other)["messages"][
            0
        ]["id"]
        not in ids
    )


def test_an_older_file_is_migrated_when_read(data_dir: Path) -> None:
    store = opened(data_dir)
    conversation_id = storage.new_id()
    legacy = {
        "id": conversation_id,
        "created_at": "2026-01-01T00:00:00.000000Z",
        "updated_at": "2026-01-01T00:00:00.000000Z",
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "reply"}],
    }
    (store.conversations / f"{conversation_id}.json").write_text(json.dumps(legacy))
    conversation = asyncio.run(store.get(conversation_id))
    assert conversation["schema_version"] == storage.SCHEMA_VERSION
    branch = storage.current_branch(conversation)
    assert [m["content"] for m in branch] == ["old", "reply"]
    assert branch[1]["parent_id"] == branch[0]["id"]
    assert branch[1]["status"] == "complete"
    asyncio.run(turn(store, conversation_id, "new", "ok"))
    saved = json.loads((store.conversations / f"{conversation_id}.json").read_text())
    assert saved["schema_version"] == storage.SCHEMA_VERSION
    assert len(saved["messages"]) == 4


def test_cursor_round_trip_and_garbage() -> None:
    summary: storage.Summary = {
        "id": "a" * 32, "title": None, "created_at": "t", "updated_at": "2026-01-01T00:00:00.000000Z",
        "model": "m", "message_count": 0, "totals": {"input_tokens": 0, "output_tokens": 0, "cost": None},
    }  # fmt: skip
    assert storage.decode_cursor(storage.encode_cursor(summary)) == ("2026-01-01T00:00:00.000000Z", "a" * 32)
    for garbage in ("", "!!", "Zm9v", "x" * 100):
        with pytest.raises(storage.InvalidCursor):
            storage.decode_cursor(garbage)


# --- what a read-modify-write keeps --------------------------------------------------------------

# Keys this version does not know: a newer version's optional fields, or a user's own notes.
KNOWN_KEYS = storage.Conversation.__annotations__.keys() | storage.Message.__annotations__.keys()
NAME = st.characters(categories=["Ll", "Lu", "Nd"], include_characters="_")
UNKNOWN_KEY = st.text(NAME, min_size=1).filter(lambda k: k not in KNOWN_KEYS)
UNKNOWN_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
EXTRAS = st.dictionaries(UNKNOWN_KEY, UNKNOWN_VALUE, max_size=3)


@given(top=EXTRAS, on_user=EXTRAS, on_reply=EXTRAS, change=st.sampled_from(["title", "turn", "finish"]))
@settings(max_examples=40, deadline=None, database=None, derandomize=True)
def test_a_read_modify_write_keeps_every_key(
    tmp_path_factory: pytest.TempPathFactory,
    top: dict[str, Any],
    on_user: dict[str, Any],
    on_reply: dict[str, Any],
    change: str,
) -> None:
    store = opened(tmp_path_factory.mktemp("data"))
    conversation_id = asyncio.run(turn(store, new(), "hi", "hello"))
    path = store.conversations / f"{conversation_id}.json"
    doc = json.loads(path.read_text())
    doc.update(top)
    doc["messages"][0].update(on_user)
    doc["messages"][1].update(on_reply)
    path.write_text(json.dumps(doc))
    fresh = opened(store.data_dir)  # nothing cached: the file is read
    if change == "title":
        asyncio.run(fresh.update(conversation_id, {"title": "renamed"}))
    elif change == "turn":
        asyncio.run(turn(fresh, conversation_id, "again", "sure"))
    else:
        reply: Message = doc["messages"][1]
        reply["content"] = "rewritten"
        asyncio.run(fresh.finish_reply(conversation_id, reply))
    saved = json.loads(path.read_text())
    assert saved.items() >= top.items()
    assert saved["messages"][0].items() >= on_user.items()
    assert saved["messages"][1].items() >= on_reply.items()
    assert asyncio.run(fresh.get(conversation_id)) == saved  # and the API reads what is on disk
