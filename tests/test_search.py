"""Search and export through the API: every rule of the issue, hostile queries, downloads."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_index import hand_written


@pytest.fixture
def api(client: TestClient) -> TestClient:
    client.app.state.index.check_interval = 0  # type: ignore[attr-defined]
    return client


def search(api: TestClient, q: str, **params: Any) -> list[dict[str, Any]]:
    response = api.get("/api/search", params={"q": q, **params})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def hits(api: TestClient, q: str) -> set[str]:
    return {item["conversation_id"] for item in search(api, q)}


def marked(item: dict[str, Any]) -> list[str]:
    return [segment["text"] for segment in item["snippet"] if segment["match"]]


def test_words_are_anded_phrases_and_prefixes_work(api: TestClient, data_dir: Path) -> None:
    both = hand_written(data_dir, "the quick brown fox jumps")
    one = hand_written(data_dir, "a brown dog sleeps, quick as ever")
    other = hand_written(data_dir, "deployment of the server went fine")
    assert hits(api, "quick brown") == {both, one}
    assert hits(api, "fox brown") == {both}
    assert hits(api, '"quick brown"') == {both}
    assert hits(api, '"brown quick"') == set()
    assert hits(api, "deploy*") == {other}
    assert hits(api, "deploy") == set()
    assert marked(search(api, '"quick brown"')[0]) == ["quick brown"]
    assert marked(search(api, "deploy*")[0]) == ["deployment"]


def test_case_and_accents_do_not_matter(api: TestClient, data_dir: Path) -> None:
    accented = hand_written(data_dir, "Un café à Paris, s'il vous plaît")
    plain = hand_written(data_dir, "CAFE OPENING HOURS")
    assert hits(api, "cafe") == {accented, plain}
    assert hits(api, "Café") == {accented, plain}
    assert hits(api, "plait") == {accented}
    assert marked(search(api, "cafe paris")[0]) == ["café", "Paris"]


def test_chinese_and_japanese_substrings_of_two_or_more_characters(api: TestClient, data_dir: Path) -> None:
    japanese = hand_written(data_dir, "明日は東京都の天気予報を確認します")
    chinese = hand_written(data_dir, "我们明天去北京大学参观")
    mixed = hand_written(data_dir, "iPhone買いました and more words")
    assert hits(api, "東京都") == {japanese}
    assert hits(api, "天気予報") == {japanese}
    assert hits(api, "天気") == {japanese}  # two characters: a scan
    assert hits(api, "北京") == {chinese}
    assert hits(api, "京大学") == {chinese}
    assert hits(api, "北京 参观") == {chinese}
    assert hits(api, "iphone買い") == {mixed}
    assert hits(api, "買い more") == {mixed}
    assert marked(search(api, "天気")[0]) == ["天気"]
    assert marked(search(api, "京大学")[0]) == ["京大学"]


def test_title_matches_first_then_relevance_then_newest(api: TestClient, data_dir: Path) -> None:
    older = hand_written(data_dir, "one mention of heron among many other words in a long message")
    time.sleep(0.01)
    newer = hand_written(data_dir, "one mention of heron among many other words in a long message")
    dense = hand_written(data_dir, "heron heron heron")
    titled = hand_written(data_dir, "nothing here", title="Heron watching")
    items = search(api, "heron")
    assert [(item["conversation_id"], item["message_id"] is None) for item in items] == [
        (titled, True),
        (dense, False),
        (newer, False),
        (older, False),
    ]
    assert items[0]["conversation_title"] == "Heron watching"
    assert items[0]["role"] is None
    assert items[1]["role"] == "user"
    assert marked(items[0]) == ["Heron"]


def test_a_snippet_is_plain_text_segments_around_the_match(api: TestClient, data_dir: Path) -> None:
    text = "<b>bold</b> " + "filler " * 60 + "the needle is <script>alert(1)</script> here " + "tail " * 80
    conversation_id = hand_written(data_dir, text)
    (item,) = search(api, "needle")
    assert item["conversation_id"] == conversation_id
    joined = "".join(segment["text"] for segment in item["snippet"])
    assert "needle is <script>alert(1)</script> here" in joined  # text, never markup to render
    assert joined.startswith("…") and joined.endswith("…")
    assert len(joined) < 400
    assert set(item["snippet"][0]) == {"text", "match"}


def test_pages_follow_the_cursor_without_overlap(api: TestClient, data_dir: Path) -> None:
    ids = {hand_written(data_dir, f"message {n} about puffins") for n in range(5)}
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, str | int] = {"q": "puffins", "limit": 2, **({"cursor": cursor} if cursor else {})}
        body = api.get("/api/search", params=params).json()
        seen += [item["conversation_id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    bad = api.get("/api/search", params={"q": "puffins", "cursor": "bm9wZQ"})
    assert (bad.status_code, bad.json()["type"]) == (400, "invalid_cursor")


def test_a_deleted_conversation_is_no_longer_found(api: TestClient, data_dir: Path) -> None:
    conversation_id = hand_written(data_dir, "soon gone: albatross", title="Albatross")
    assert hits(api, "albatross") == {conversation_id}
    assert api.delete(f"/api/conversations/{conversation_id}").status_code == 204
    assert search(api, "albatross") == []


@pytest.mark.parametrize("q", ["", "   ", "x" * 501])
def test_an_empty_or_over_long_query_is_a_422(api: TestClient, q: str) -> None:
    response = api.get("/api/search", params={"q": q})
    assert (response.status_code, response.json()["type"]) == (422, "invalid_request")


HOSTILE = [
    '"unbalanced',
    'a"b"c"',
    "NEAR(a b, 2)",
    "a AND OR NOT b",
    "title:secret",
    "{text}: x",
    "^start",
    "-minus +plus",
    "(((",
    "*",
    "a*b*",
    "'; DROP TABLE docs; --",
    "\x00\x02\x03",
    "0\x00",
    "needle\x00",
    "🙂 emoji",
    "x" * 500,
    " ".join(["w"] * 40),
]


@pytest.mark.parametrize("q", HOSTILE)
def test_a_hostile_query_gets_results_or_a_clear_400(api: TestClient, data_dir: Path, q: str) -> None:
    hand_written(data_dir, "some text to search: title secret start minus plus")
    response = api.get("/api/search", params={"q": q})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["type"] == "invalid_query"
        assert response.json()["detail"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    q=st.text(alphabet=st.sampled_from('ab "*()^:-+,.NEARORANDNOT{}東京都\x00\x02é'), min_size=1, max_size=40)
)
def test_any_query_gets_results_or_a_400_never_a_500(api: TestClient, q: str) -> None:
    for endpoint in ("/api/search", "/api/conversations"):
        response = api.get(endpoint, params={"q": q})
        assert response.status_code in (200, 400, 422), (q, response.text)
        if response.status_code == 400:
            assert response.json()["type"] == "invalid_query"


def test_the_listing_filters_titles(api: TestClient, data_dir: Path) -> None:
    trip = hand_written(data_dir, "hello", title="Trip to Zürich")
    hand_written(data_dir, "trip is in the message only", title="Groceries")
    tokyo = hand_written(data_dir, "hi", title="東京旅行の計画")
    assert [s["id"] for s in api.get("/api/conversations", params={"q": "zurich"}).json()["items"]] == [trip]
    assert [s["id"] for s in api.get("/api/conversations", params={"q": "tri"}).json()["items"]] == [trip]
    assert [s["id"] for s in api.get("/api/conversations", params={"q": "旅行"}).json()["items"]] == [tokyo]
    assert len(api.get("/api/conversations").json()["items"]) == 3


# --- export -------------------------------------------------------------------------------------


def branched(api: TestClient, data_dir: Path) -> str:
    """A conversation with two branches: an edited first message, the current branch the second."""
    conversation_id = hand_written(
        data_dir, "first try", "first answer", title='Line one\nline two 🎉 / "quoted"'
    )
    path = data_dir / "conversations" / f"{conversation_id}.json"
    doc = json.loads(path.read_bytes())
    doc["messages"][1].update(model="openai/fake-gpt-1", status="complete")
    doc["messages"] += [
        {"id": "b" * 32, "parent_id": None, "role": "user", "content": "second try",
         "created_at": doc["created_at"]},
        {"id": "c" * 32, "parent_id": "b" * 32, "role": "assistant", "content": "**second** answer",
         "created_at": doc["created_at"], "model": "anthropic/fake-claude", "status": "complete"},
    ]  # fmt: skip
    doc["current_id"] = "c" * 32
    doc["unknown_future_field"] = {"kept": True}
    path.write_text(json.dumps(doc, ensure_ascii=False))
    return conversation_id


def test_json_export_is_the_file_with_every_branch(api: TestClient, data_dir: Path) -> None:
    conversation_id = branched(api, data_dir)
    response = api.get(f"/api/conversations/{conversation_id}/export", params={"format": "json"})
    assert response.status_code == 200, response.text
    assert response.content == (data_dir / "conversations" / f"{conversation_id}.json").read_bytes()
    assert len(response.json()["messages"]) == 4
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="')
    name = unquote(disposition.split("filename*=UTF-8''", 1)[1])
    assert name == f"Line one line two 🎉 quoted - {conversation_id[:8]}.json"
    assert "\n" not in disposition and all(ord(c) < 128 for c in disposition)


def test_markdown_export_is_the_current_branch_with_models_and_dates(api: TestClient, data_dir: Path) -> None:
    conversation_id = branched(api, data_dir)
    response = api.get(f"/api/conversations/{conversation_id}/export", params={"format": "markdown"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/markdown")
    text = response.text
    assert text.startswith('# Line one line two 🎉 / "quoted"\n')
    assert "second try" in text and "**second** answer" in text
    assert "first try" not in text
    assert "## Assistant (anthropic/fake-claude) · " in text
    assert "## User · 20" in text
    assert response.headers["content-disposition"].endswith(f"{conversation_id[:8]}.md")


def test_export_refuses_a_bad_format_and_unknown_ids(api: TestClient, data_dir: Path) -> None:
    conversation_id = hand_written(data_dir, "hi")
    bad = api.get(f"/api/conversations/{conversation_id}/export", params={"format": "pdf"})
    assert (bad.status_code, bad.json()["type"]) == (422, "invalid_request")
    assert api.get("/api/export", params={"format": "csv"}).status_code == 422
    missing = api.get(f"/api/conversations/{'0' * 32}/export")
    assert (missing.status_code, missing.json()["type"]) == (404, "conversation_not_found")
    assert api.get("/api/conversations/..%2Fx/export").status_code == 404


def test_the_json_zip_holds_every_file_as_it_is(api: TestClient, data_dir: Path) -> None:
    ids = [branched(api, data_dir), hand_written(data_dir, "another", title="Ünïcode ✓")]
    (data_dir / "conversations" / f"{'d' * 32}.json").write_text("{broken")  # unreadable: skipped
    response = api.get("/api/export", params={"format": "json"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == sorted(f"conversations/{cid}.json" for cid in ids)
        for cid in ids:
            assert (
                archive.read(f"conversations/{cid}.json")
                == (data_dir / "conversations" / f"{cid}.json").read_bytes()
            )


def test_the_markdown_zip_has_a_readable_file_per_conversation(api: TestClient, data_dir: Path) -> None:
    conversation_id = branched(api, data_dir)
    response = api.get("/api/export", params={"format": "markdown"})
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        (name,) = archive.namelist()
        assert name == f"conversations/Line one line two 🎉 quoted - {conversation_id[:8]}.md"
        assert "**second** answer" in archive.read(name).decode()


def test_the_zip_is_streamed_a_conversation_at_a_time(api: TestClient, data_dir: Path) -> None:
    for n in range(30):
        hand_written(data_dir, f"conversation {n} " + "text " * 2000)
    chunks = 0
    with api.stream("GET", "/api/export") as response:
        assert response.headers.get("content-length") is None
        body = b""
        for chunk in response.iter_raw():
            chunks += 1
            body += chunk
    assert chunks >= 30
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert len(archive.namelist()) == 30
