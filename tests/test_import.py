"""Importing exports: ChatGPT's (single and sharded), Claude.ai's and our own, by HTTP and command line."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

import importing
from storage import current_branch
from tests import exports
from tests.exports import dumps, zipped

ROOT = Path(__file__).resolve().parent.parent


def upload(client: TestClient, data: bytes, name: str = "conversations.json") -> Any:
    return client.post("/api/import", files={"file": (name, data, "application/octet-stream")})


def stored(data_dir: Path, conversation_id: str) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(
        (data_dir / "conversations" / f"{conversation_id}.json").read_bytes()
    )
    return result


class ByStart:
    """The messages of a stored conversation, looked up by how their text starts."""

    def __init__(self, conversation: dict[str, Any]) -> None:
        self.messages = conversation["messages"]

    def __getitem__(self, start: str) -> dict[str, Any]:
        (found,) = [m for m in self.messages if m["content"].startswith(start)]
        result: dict[str, Any] = found
        return result


def test_chatgpt_export_keeps_every_branch_and_counts_what_it_drops(
    client: TestClient, data_dir: Path
) -> None:
    doc = exports.chatgpt_rich()
    response = upload(client, dumps([doc]))
    assert response.status_code == 200, response.text
    conversation_id = importing.derived_id("chatgpt", doc["conversation_id"])
    assert response.json() == {
        "imported": [
            {
                "id": conversation_id,
                "title": "Sorting in Python",
                "messages": 9,
                "source_id": doc["conversation_id"],
            }
        ],
        "skipped": [],
        # hidden system node; o3's thoughts and recap; the python run; the search call and its page; the image
        "dropped": {"browsing": 1, "hidden": 1, "image": 1, "thinking": 2, "tool": 1, "tool_call": 1},
    }
    saved = stored(data_dir, conversation_id)
    assert saved["source"] == {"kind": "chatgpt", "id": doc["conversation_id"]}
    assert saved["system"] == "I am a data engineer.\n\nAnswer briefly, with code."
    assert saved["created_at"] == "2023-11-14T22:13:20.000000Z"
    messages = ByStart(saved)
    question, code = messages["Sort a list of dicts by "], messages["```python\nrows = [{'a':"]
    answer, regenerated = messages["Use `sorted(rows, key=la"], messages["You can use operator.ite"]
    # the thinking nodes are gone and the code hangs from the question; the python run is gone and
    # both versions of the answer hang from the code
    assert code["parent_id"] == question["id"] and question["parent_id"] is None
    assert answer["parent_id"] == regenerated["parent_id"] == code["id"]
    assert code["content"].endswith("sorted(rows, key=lambda r: r['a'])\n```")
    assert (answer["status"], answer["finish_reason"], answer["model"]) == ("complete", "stop", "openai/o3")
    assert (regenerated["status"], regenerated["finish_reason"]) == ("incomplete", None)
    picture = messages["[image not imported]\n\nW"]
    assert picture["role"] == "user" and picture["parent_id"] == answer["id"]
    quote = messages["> sorted() has a key par"]
    assert quote["content"].endswith("— [Sorting Techniques](https://docs.python.org/3/howto/sorting.html)")
    assert quote["parent_id"] == messages["Find the docs for sorted("]["id"]
    final = messages["The docs say `key` is ca"]
    assert final["status"] == "incomplete" and final["parent_id"] == quote["id"]
    assert saved["current_id"] == final["id"]
    assert final["created_at"] > question["created_at"] >= saved["created_at"]
    # the API shows the current branch, in order
    shown = client.get(f"/api/conversations/{conversation_id}").json()
    assert [m["id"] for m in shown["messages"]] == [m["id"] for m in current_branch(saved)]  # type: ignore[arg-type]
    assert shown["messages"][2]["id"] == answer["id"] and shown["model"] == "openai/gpt-4o"


def test_claude_zip_keeps_edits_as_branches(client: TestClient, data_dir: Path) -> None:
    doc, ids = exports.claude_rich()
    archive = zipped({"conversations.json": dumps([doc]), "users.json": b"[]", "projects.json": b"[]"})
    response = client.post("/api/import", content=archive, headers={"content-type": "application/zip"})
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["dropped"] == {"file": 1, "thinking": 1, "tool": 1, "tool_call": 1}
    saved = stored(data_dir, report["imported"][0]["id"])
    assert saved["title"] == "Notes summary" and saved["source"]["kind"] == "claude"
    assert saved["model"] == "openai/fake-gpt-1"  # Claude.ai exports name no model: the service's default
    messages = {m["id"]: m for m in saved["messages"]}
    first, edit = messages[ids["ask"].replace("-", "")], messages[ids["edit"].replace("-", "")]
    assert first["parent_id"] is None and edit["parent_id"] is None  # an edited first message: two roots
    assert "notes.txt:\n\n````\nLine one.\n```\nLine two.\n````" in first["content"]
    reply = messages[ids["think"].replace("-", "")]
    assert reply["content"] == "Two lines of notes." and "model" not in reply  # unknown, not invented
    assert reply["created_at"] == "2025-03-04T10:01:05.123456Z"
    branch = [m["content"] for m in current_branch(saved)]  # type: ignore[arg-type]
    assert branch == [
        "Summarise them in French.",
        "Deux lignes de notes.",
        "And this photo?",
        "Une photo d'un chat.",
    ]


def test_sharded_chatgpt_zip_lands_and_lists_at_once(client: TestClient) -> None:
    shards = [[exports.chatgpt_simple(i) for i in range(3)], [exports.chatgpt_simple(i) for i in range(3, 5)]]
    response = upload(client, exports.chatgpt_sharded_zip(shards), "chatgpt-export.zip")
    assert response.status_code == 200, response.text
    assert [item["title"] for item in response.json()["imported"]] == [f"Conversation {i}" for i in range(5)]
    listed = client.get("/api/conversations").json()["items"]
    assert sorted(item["title"] for item in listed) == [f"Conversation {i}" for i in range(5)]
    assert all(item["message_count"] == 4 for item in listed)


def test_importing_again_adds_nothing_and_says_so(client: TestClient) -> None:
    first = upload(client, dumps([exports.chatgpt_simple(1), exports.chatgpt_simple(2)]))
    again = upload(
        client, dumps([exports.chatgpt_simple(1), exports.chatgpt_simple(2), exports.chatgpt_simple(3)])
    )
    assert first.status_code == again.status_code == 200
    assert [item["title"] for item in again.json()["imported"]] == ["Conversation 3"]
    assert [(s["title"], s["reason"]) for s in again.json()["skipped"]] == [
        ("Conversation 1", "already imported"),
        ("Conversation 2", "already imported"),
    ]
    assert len(client.get("/api/conversations").json()["items"]) == 3


def test_one_bad_conversation_is_skipped_and_the_rest_land(client: TestClient) -> None:
    broken = exports.chatgpt_simple(2)
    broken["mapping"] = "not a tree"
    empty = exports.chatgpt_simple(3)
    empty["mapping"] = {"client-created-root": {"id": "client-created-root", "message": None, "children": []}}
    docs = [exports.chatgpt_simple(1), broken, empty, {"mapping": {}}, exports.chatgpt_simple(4)]
    response = upload(client, dumps(docs))
    assert response.status_code == 200, response.text
    report = response.json()
    assert [item["title"] for item in report["imported"]] == ["Conversation 1", "Conversation 4"]
    assert report["skipped"] == [
        {
            "source_id": broken["conversation_id"],
            "title": "Conversation 2",
            "reason": "has no 'mapping' object holding its messages",
        },
        {
            "source_id": empty["conversation_id"],
            "title": "Conversation 3",
            "reason": "holds no message that could be imported",
        },
        {"source_id": None, "title": None, "reason": "has no conversation_id"},
    ]


def test_a_file_holds_one_kind_of_conversation(client: TestClient) -> None:
    claude = exports.claude_simple(2)
    response = upload(client, dumps([exports.chatgpt_simple(1), claude]))
    assert response.status_code == 200, response.text
    assert response.json()["skipped"] == [
        {
            "source_id": claude["uuid"],
            "title": "Claude 2",
            "reason": "is not a ChatGPT conversation like the others in its file",
        }
    ]


def test_a_file_cut_off_keeps_what_came_before(client: TestClient) -> None:
    data = dumps([exports.chatgpt_simple(i) for i in range(3)])
    response = upload(client, data[: len(data) - 200])
    assert response.status_code == 200, response.text
    report = response.json()
    assert len(report["imported"]) == 2
    assert report["skipped"][0]["reason"].startswith(
        "conversations.json is cut off or not valid JSON after 2"
    )


@pytest.mark.parametrize(
    ("data", "found"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "found a PNG image"),
        (b"hello, world", "found a file that is neither a zip nor JSON"),
        (b'[{"role": "user", "content": "hi"}]', "found a JSON array of objects with keys content, role"),
        (b"[1, 2", "found a JSON array of int values"),
        (b'{"files": ["conversations-000.json"]}', "it is the index of a sharded ChatGPT export"),
        (b"[{]", "not valid JSON"),
        (
            zipped({"notes.txt": b"x", "photo.jpg": b"y"}),
            "found a zip of 2 files (notes.txt, photo.jpg) without",
        ),
    ],
)
def test_a_file_that_is_no_export_is_refused_saying_what_it_is(
    client: TestClient, data: bytes, found: str
) -> None:
    response = upload(client, data)
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "unknown_import_format"
    assert found in response.json()["detail"]
    assert client.get("/api/conversations").json()["items"] == []


@pytest.mark.parametrize(
    ("send", "found"),
    [
        ({"files": {"file": ("conversations.json", b"[]")}}, "found conversations.json: an empty list"),
        ({"content": b"", "headers": {"content-type": "application/json"}}, "the request has no file"),
        ({"files": {"other": ("x.json", b"[]")}}, "a form without a field named 'file'"),
        ({"files": {"file": ("c.json", dumps([{"mapping": {}}]))}}, "no conversation that could be imported"),
    ],
)
def test_nothing_to_import_is_an_error_not_an_empty_success(
    client: TestClient, send: dict[str, Any], found: str
) -> None:
    response = client.post("/api/import", **send)
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "nothing_to_import"
    assert found in response.json()["detail"]


def test_a_zip_bomb_is_refused_before_it_is_unpacked(
    make_client: Callable[..., TestClient], data_dir: Path
) -> None:
    client = make_client(CHAT_MAX_IMPORT_BYTES=1_000_000)
    bomb = zipped({"conversations.json": b"[" + b" " * 50_000_000 + b"]"})
    assert len(bomb) < 100_000
    response = upload(client, bomb, "export.zip")
    assert response.status_code == 413, response.text
    assert response.json() == {
        "detail": "the conversation files in the zip unpack to 50000002 bytes; the limit is 1000000 "
        "bytes (CHAT_MAX_IMPORT_BYTES)",
        "type": "import_too_large",
    }
    assert not list(data_dir.glob(".import-*"))  # the upload is gone too


def test_the_import_route_has_its_own_body_limit(make_client: Callable[..., TestClient]) -> None:
    client = make_client(CHAT_MAX_BODY_BYTES=1024, CHAT_MAX_IMPORT_BYTES=200_000)
    export = dumps([exports.chatgpt_simple(i) for i in range(20)])
    assert 1024 < len(export) < 200_000
    assert upload(client, export).status_code == 200
    chat = client.post("/api/chat", content=export, headers={"content-type": "application/json"})
    assert chat.status_code == 413 and "CHAT_MAX_BODY_BYTES" in chat.json()["detail"]
    too_big = upload(client, b" " * 200_001)
    assert too_big.status_code == 413
    assert too_big.json()["type"] == "body_too_large" and "CHAT_MAX_IMPORT_BYTES" in too_big.json()["detail"]


def test_own_export_round_trips_exactly(
    make_client: Callable[..., TestClient], tmp_path: Path, upstream: Any
) -> None:
    source = make_client()
    first = source.post("/api/chat", json={"message": "Hello"}).json()["conversation_id"]
    source.post("/api/chat", json={"message": "Again", "conversation_id": first})
    source.patch(f"/api/conversations/{first}", json={"system": "Be brief."})
    second = source.post("/api/chat", json={"message": "Another"}).json()["conversation_id"]
    folder = source.app.state.settings.data_dir / "conversations"  # type: ignore[attr-defined]
    files = {f"conversations/{cid}.json": (folder / f"{cid}.json").read_bytes() for cid in (first, second)}
    target = make_client(CHAT_DATA_DIR=tmp_path / "elsewhere")
    response = upload(target, zipped({"manifest.json": b"{}", **files}), "export.zip")
    assert response.status_code == 200, response.text
    assert sorted(item["id"] for item in response.json()["imported"]) == sorted([first, second])
    for name, data in files.items():
        assert orjson.loads((tmp_path / "elsewhere" / name).read_bytes()) == orjson.loads(data)
    # one conversation file alone, into a third data dir; and again: already there
    third = make_client(CHAT_DATA_DIR=tmp_path / "third")
    single = files[f"conversations/{first}.json"]
    assert upload(third, single, f"{first}.json").json()["imported"][0]["id"] == first
    assert upload(third, single).json()["skipped"] == [
        {"source_id": first, "title": "Hello", "reason": "already imported"}
    ]


def test_command_line_import_needs_no_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = tmp_path / "export"
    shards.mkdir()
    (shards / "conversations-000.json").write_bytes(dumps([exports.chatgpt_simple(i) for i in range(2)]))
    (shards / "conversations-001.json").write_bytes(dumps([exports.chatgpt_simple(2)]))
    claude = tmp_path / "claude.zip"
    claude.write_bytes(zipped({"conversations.json": dumps([exports.claude_simple(1)])}))
    junk = tmp_path / "notes.txt"
    junk.write_text("not an export")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "OPENAI_", "ANTHROPIC_"))}
    env["CHAT_DATA_DIR"] = str(tmp_path / "data")
    run = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "import", str(shards), str(claude), str(junk)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert run.returncode == 1, run.stderr  # one file was refused
    assert f"{shards}: imported 3, skipped 0" in run.stdout
    assert f"{claude}: imported 1, skipped 0" in run.stdout
    assert f"{junk}: found a file that is neither a zip nor JSON" in run.stderr
    files = sorted((tmp_path / "data" / "conversations").glob("*.json"))
    assert len(files) == 4
    # the same entry point in this process: a second import adds nothing, and says so as JSON
    status = importing.run_cli(["--json", str(claude)], tmp_path / "data", 10**9, "openai/x")
    assert status == 0
    assert orjson.loads(capsys.readouterr().out)["skipped"][0]["reason"] == "already imported"


def test_zip_entries_are_read_as_streams(tmp_path: Path) -> None:
    """A large conversations.json inside a zip is parsed one conversation at a time."""
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("conversations.json", dumps([exports.chatgpt_simple(i) for i in range(300)]))
    with contextlib.ExitStack() as stack:
        found = importing.read_export(path, 10**9, "openai/x", stack)
        first = importing.take(found, 3)
        assert isinstance(first[0], importing.Section)
        assert [type(item) for item in first[1:]] == [importing.Converted, importing.Converted]
        assert len(importing.take(found, 1000)) == 298


def test_a_broken_form_or_an_endless_body_is_refused(make_client: Callable[..., TestClient]) -> None:
    client = make_client(CHAT_MAX_IMPORT_BYTES=100_000)
    no_boundary = client.post("/api/import", content=b"x", headers={"content-type": "multipart/form-data"})
    assert no_boundary.status_code == 400
    assert no_boundary.json()["type"] == "unknown_import_format"
    assert "no boundary" in no_boundary.json()["detail"]

    def chunks() -> Any:  # no Content-Length: counted while it arrives
        for _ in range(50):
            yield b" " * 10_000

    endless = client.post("/api/import", content=chunks(), headers={"content-type": "application/json"})
    assert endless.status_code == 413
    assert endless.json()["type"] == "body_too_large" and "CHAT_MAX_IMPORT_BYTES" in endless.json()["detail"]


def test_children_of_dropped_nodes_hang_from_the_nearest_kept_one() -> None:
    def message(n: int) -> Any:
        return importing.user_message(f"{n:032x}", f"m{n}", "2026-01-01T00:00:00.000000Z")

    nodes = [
        importing.Node("root", None),
        importing.Node("a", "root", message(1)),
        importing.Node("tool", "a", dropped="tool"),
        importing.Node("b", "tool", message(2)),
        importing.Node("c", "tool", message(3)),
        importing.Node("x", "y", message(4)),  # x and y are each other's parent: no way in from a root
        importing.Node("y", "x", message(5)),
    ]
    drops: Counter[str] = Counter()
    messages, current = importing.rebuild_tree(nodes, "tool", drops)
    assert [(m["content"], m["parent_id"]) for m in messages] == [
        ("m1", None),
        ("m2", f"{1:032x}"),
        ("m3", f"{1:032x}"),
    ]
    assert current == f"{1:032x}"  # the current node was dropped: its nearest kept ancestor
    assert drops == {"tool": 1, "unreachable": 2}


def test_a_date_outside_what_python_holds_falls_back_instead_of_failing(client: TestClient) -> None:
    claude = exports.claude_simple(1)
    claude["created_at"] = "0001-01-01T00:00:00+14:00"  # before the year 1 once in UTC
    claude["chat_messages"][0]["created_at"] = "9999-12-31T23:59:59-14:00"  # after 9999 in UTC
    response = upload(client, dumps([claude]))
    assert response.status_code == 200, response.text
    assert [item["source_id"] for item in response.json()["imported"]] == [claude["uuid"]]


def test_a_damaged_zip_entry_is_reported_not_a_server_error(client: TestClient) -> None:
    docs = [exports.chatgpt_simple(i) for i in range(40)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # stored: the damage below keeps valid JSON
        archive.writestr("conversations.json", dumps(docs))
    damaged = buffer.getvalue().replace(b"Question 1 of conversation 39", b"question 1 of conversation 39")
    response = upload(client, damaged, "export.zip")  # its CRC-32 no longer matches
    assert response.status_code in (200, 400), response.text
    reasons = [item["reason"] for item in response.json()["skipped"]]
    assert any(reason.startswith("conversations.json is damaged") for reason in reasons), reasons


def test_an_encrypted_zip_is_refused_saying_so(client: TestClient) -> None:
    archive = bytearray(zipped({"conversations.json": dumps([exports.chatgpt_simple(1)])}))
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        archive[archive.index(signature) + flags_at] |= 0x1  # what a password-protected zip sets
    response = upload(client, bytes(archive), "export.zip")
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "unknown_import_format"
    assert "encrypted" in response.json()["detail"]


def test_the_unpacked_limit_counts_only_what_is_read(make_client: Callable[..., TestClient]) -> None:
    client = make_client(CHAT_MAX_IMPORT_BYTES=1_000_000)
    export = {
        "conversations.json": dumps([exports.chatgpt_simple(1)]),
        "file-AbC123-photo.png": b"\x89PNG" + bytes(5_000_000),  # an attachment: never unpacked
    }
    response = upload(client, zipped(export), "export.zip")
    assert response.status_code == 200, response.text
    assert len(response.json()["imported"]) == 1


def test_what_was_found_is_named_in_a_detail_of_bounded_size(client: TestClient) -> None:
    long = "k" * 60_000  # a zip entry name holds at most 65,535 bytes
    for data, name in (
        (dumps({long: 1, "other": 2}), "conversations.json"),
        (zipped({f"{long}.txt": b"x", "notes.txt": b"y"}), "export.zip"),
    ):
        response = upload(client, data, name)
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert "k" * 57 + "..." in detail and len(detail) < 1000
