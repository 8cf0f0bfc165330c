"""The derived index: kept in step by every write, repaired from the files, rebuilt when lost."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import storage
from search_index import IndexBuilding, SearchIndex
from storage import Store
from tests.test_storage import PARAMS, new, turn

ROOT = Path(__file__).resolve().parent.parent


def opened(data_dir: Path) -> tuple[Store, SearchIndex]:
    index = SearchIndex(data_dir)
    store = Store(data_dir, indexer=index)
    store.open()
    index.open()
    index.check_interval = 0  # every call looks at the directory
    return store, index


def hand_written(data_dir: Path, *texts: str, title: str | None = None) -> str:
    """A conversation file written as a person or a restore would: no Store, no index update."""
    conversation = storage.new_conversation(model="openai/x", system=None, params=PARAMS, title=title)
    parent = None
    for position, text in enumerate(texts):
        message: storage.Message = {
            "id": storage.new_id(),
            "parent_id": parent,
            "role": "user" if position % 2 == 0 else "assistant",
            "content": text,
            "created_at": storage.now(),
        }
        conversation["messages"].append(message)
        parent = message["id"]
    conversation["current_id"] = parent
    folder = data_dir / "conversations"
    folder.mkdir(parents=True, exist_ok=True)
    replace_by_hand(folder / f"{conversation['id']}.json", storage.encode(conversation))
    return conversation["id"]


def replace_by_hand(path: Path, data: bytes) -> None:
    """What an editor does: write a new file and rename it over the old one."""
    tmp = path.with_name("edit.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def listed(index: SearchIndex, q: str | None = None) -> list[str]:
    return [s["id"] for s in (await index.page(50, None, q))[0]]


async def found(index: SearchIndex, q: str) -> list[tuple[str, str | None]]:
    return [(i["conversation_id"], i["message_id"]) for i in (await index.search(q, 50, None))[0]]


def rows(index: SearchIndex, table: str) -> int:
    with sqlite3.connect(index.path) as db:
        count: int = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return count


def test_every_write_updates_the_index_and_a_delete_leaves_nothing(data_dir: Path) -> None:
    store, index = opened(data_dir)

    async def scenario() -> None:
        first = await turn(store, new(), "tell me about zebras", "zebras have stripes")
        second = await turn(store, new(), "and giraffes", "long necks")
        assert await listed(index) == [second, first]
        assert {cid for cid, _ in await found(index, "zebras")} == {first}
        await store.update(first, {"title": "Striped horses"})
        assert await listed(index) == [first, second]
        assert (await index.page(50, None))[0][0]["title"] == "Striped horses"
        assert await found(index, "striped") == [(first, None)]  # the title match
        await store.delete(first)
        assert await listed(index) == [second]
        assert await found(index, "zebras") == []
        await store.delete(second)

    asyncio.run(scenario())
    for table in ("conversations", "docs", "titles", "words", "grams"):
        assert rows(index, table) == 0, table


def test_files_added_changed_and_removed_by_hand_are_seen_without_a_restart(data_dir: Path) -> None:
    store, index = opened(data_dir)

    async def scenario() -> None:
        mine = await turn(store, new(), "written by the service", "ok")
        added = hand_written(data_dir, "restored from a backup about walruses")
        assert set(await listed(index)) == {mine, added}
        assert await found(index, "walruses") == [(added, await message_id(added, 0))]

        path = data_dir / "conversations" / f"{added}.json"
        doc = json.loads(path.read_bytes())
        doc["messages"][0]["content"] = "now about narwhals"
        doc["title"] = "Edited by hand"
        replace_by_hand(path, json.dumps(doc).encode())
        assert await found(index, "walruses") == []
        assert await found(index, "narwhals") == [(added, doc["messages"][0]["id"])]
        assert await listed(index, "edited") == [added]

        path.unlink()
        assert await listed(index) == [mine]
        assert await found(index, "narwhals") == []

    async def message_id(conversation_id: str, position: int) -> str:
        return (await store.get(conversation_id))["messages"][position]["id"]

    asyncio.run(scenario())


def test_an_edit_in_place_is_found_by_the_full_reconcile(data_dir: Path) -> None:
    store, index = opened(data_dir)
    conversation_id = asyncio.run(turn(store, new(), "about otters", "ok"))
    path = data_dir / "conversations" / f"{conversation_id}.json"
    doc = json.loads(path.read_bytes())
    doc["messages"][0]["content"] = "about beavers, longer than before"
    path.write_text(json.dumps(doc))  # same inode, the directory's mtime unchanged
    assert index.reconcile(full=False) == 0  # a quick look trusts the inode
    assert index.reconcile() == 1  # what the start-up and the 10-minute reconcile do
    assert asyncio.run(found(index, "beavers")) == [(conversation_id, doc["messages"][0]["id"])]
    assert asyncio.run(found(index, "otters")) == [(conversation_id, None)]  # still its title


def test_writes_of_a_second_process_are_seen(data_dir: Path) -> None:
    store, index = opened(data_dir)
    mine = asyncio.run(turn(store, new(), "from here", "ok"))
    script = (
        f"import asyncio, sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from pathlib import Path\n"
        "from search_index import SearchIndex\n"
        "from storage import Store\n"
        "from tests.test_storage import new, turn\n"
        f"index = SearchIndex(Path({str(data_dir)!r}))\n"
        f"store = Store(Path({str(data_dir)!r}), indexer=index)\n"
        "store.open(); index.open()\n"
        "print(asyncio.run(turn(store, new(), 'from the other process about lemurs', 'ok')))\n"
    )
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr
    theirs = other.stdout.strip()
    assert asyncio.run(listed(index)) == [theirs, mine]
    assert {cid for cid, _ in asyncio.run(found(index, "lemurs"))} == {theirs}


def delete_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def until_built(index: SearchIndex) -> None:
    while True:
        try:
            await index.search("anything", 1, None)
            return
        except IndexBuilding:
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: delete_database(path),
        lambda path: path.write_bytes(b"this is not a database" * 100),
        lambda path: sqlite3.connect(path, isolation_level=None).execute("PRAGMA user_version = 0").close(),
    ],
    ids=["deleted", "corrupt", "older version"],
)
def test_the_index_is_rebuilt_from_the_files(data_dir: Path, damage: Callable[[Path], Any]) -> None:
    store, index = opened(data_dir)
    ids = [asyncio.run(turn(store, new(), f"conversation {n} about tapirs", "ok")) for n in range(3)]
    index.close()
    damage(data_dir / "index.sqlite3")
    _, fresh = opened(data_dir)  # a restart
    with pytest.raises(IndexBuilding):  # files exist, nothing indexed yet
        asyncio.run(fresh.search("tapirs", 10, None))
    assert asyncio.run(fresh.page(50, None)) == ([], None)  # the listing shows what is indexed so far
    fresh.reconcile()
    assert set(asyncio.run(listed(fresh))) == set(ids)
    assert {cid for cid, _ in asyncio.run(found(fresh, "tapirs"))} == set(ids)


def test_an_index_deleted_while_running_is_rebuilt(data_dir: Path) -> None:
    store, index = opened(data_dir)
    ids = [asyncio.run(turn(store, new(), f"conversation {n} about okapis", "ok")) for n in range(3)]
    delete_database(index.path)

    async def refresh_and_wait() -> None:
        await index.refresh()  # notices, opens a new database and starts building it in a task
        await asyncio.wait_for(until_built(index), 60)

    asyncio.run(refresh_and_wait())
    assert set(asyncio.run(listed(index))) == set(ids)


def test_a_failed_index_update_never_fails_the_write_and_is_repaired(data_dir: Path) -> None:
    index = SearchIndex(data_dir, busy_timeout=0.1)
    store = Store(data_dir, indexer=index)
    store.open()
    index.open()
    index.check_interval = 0
    blocker = sqlite3.connect(index.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the index: every update times out
    conversation_id = asyncio.run(turn(store, new(), "saved despite the index about quokkas", "ok"))
    saved = json.loads((data_dir / "conversations" / f"{conversation_id}.json").read_bytes())
    assert saved["messages"][0]["content"] == "saved despite the index about quokkas"
    blocker.execute("ROLLBACK")
    blocker.close()
    assert asyncio.run(listed(index)) == [conversation_id]
    assert {cid for cid, _ in asyncio.run(found(index, "quokkas"))} == {conversation_id}


def test_unreadable_files_are_reported_and_not_listed(data_dir: Path) -> None:
    store, index = opened(data_dir)
    good = asyncio.run(turn(store, new(), "fine", "ok"))
    bad = storage.new_id()
    (data_dir / "conversations" / f"{bad}.json").write_text('{"schema_version": 1, "messages": 3}')
    assert asyncio.run(listed(index)) == [good]
    assert list(asyncio.run(index.unreadable())) == [bad]


def test_search_answers_503_while_the_index_is_first_built(
    data_dir: Path, make_client: Callable[..., TestClient]
) -> None:
    hand_written(data_dir, "waiting for the build about pangolins")
    SearchIndex(data_dir).open()  # a new index: files exist, so it starts out building
    blocker = sqlite3.connect(data_dir / "index.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the build cannot commit until we let go
    try:
        client = make_client()
        response = client.get("/api/search", params={"q": "pangolins"})
        assert response.status_code == 503, response.text
        assert response.json()["type"] == "index_building"
        assert int(response.headers["Retry-After"]) > 0
        assert client.get("/api/conversations").json()["items"] == []  # what is indexed so far
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    client.app.state.index.check_interval = 0  # type: ignore[attr-defined]
    for _ in range(600):
        response = client.get("/api/search", params={"q": "pangolins"})
        if response.status_code == 200:
            break
    assert response.status_code == 200, response.text
    assert [item["role"] for item in response.json()["items"]] == ["user"]
