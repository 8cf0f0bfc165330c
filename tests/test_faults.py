"""Provider faults and disk faults as the API reports them: documented status or SSE `error`, reply kept."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import fail_writes_containing, stream_chat
from tests.fake_upstream import FakeUpstream, Reply

MODELS = ["openai/fake-gpt-1", "anthropic/claude-fake-1"]

STREAM_FAULTS: list[tuple[list[Reply], str, bool]] = [
    # replies scripted, the SSE error type, whether part of the reply arrived first
    ([Reply(mode="midstream_error", text="a b c d e f")], "provider_unavailable", True),
    ([Reply(mode="drop_mid", text="a b c d e f")], "provider_unavailable", True),
    ([Reply(mode="stall_mid", text="a b c d e f")], "provider_timeout", True),
    ([Reply(mode="stall_headers")], "provider_timeout", False),
    ([Reply(mode="drop_before_first")] * 2, "provider_unavailable", False),
    ([Reply(mode="malformed")], "provider_malformed_reply", False),
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("replies", "kind", "partial"), STREAM_FAULTS, ids=[r[0].mode for r, _, _ in STREAM_FAULTS]
)
def test_stream_faults_end_with_an_error_event_and_a_saved_reply(
    client: TestClient, upstream: FakeUpstream, model: str, replies: list[Reply], kind: str, partial: bool
) -> None:
    upstream.script(*replies)
    events = stream_chat(client, message="go", model=model)
    name, data = events[-1]
    assert name == "error", "a failed stream must never end as a silent success"
    assert data["error"]["type"] == kind
    assert data["message"]["status"] == "error"
    streamed = "".join(d["text"] for n, d in events if n == "delta")
    assert data["message"]["content"] == streamed
    assert bool(streamed) == partial
    saved = client.get(f"/api/conversations/{events[0][1]['conversation_id']}").json()["messages"][-1]
    assert saved == data["message"]


def test_openai_error_chunk_mid_stream(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(mode="midstream_error", text="one two three four", error_type="server_error"))
    events = stream_chat(client, message="go", model="openai/fake-gpt-1")
    assert events[-1][0] == "error"
    assert events[-1][1]["message"]["content"] == "one two "


def test_nothing_is_retried_after_the_first_byte(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(mode="drop_mid", text="a b c d"), Reply(text="would be a retry"))
    events = stream_chat(client, message="go")
    assert events[-1][0] == "error"
    assert len(upstream.requests) == 1


def test_rate_limit_with_an_http_date_retry_after(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(status=429, headers={"retry-after": formatdate(time.time() + 30, usegmt=True)}))
    response = client.post("/api/chat", json={"message": "hi"})
    assert response.status_code == 429
    assert 28 <= int(response.headers["retry-after"]) <= 31


def test_spend_limit_is_a_429_without_retry_after(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(status=429, error_code="enforced_spend_limit_reached"))
    response = client.post("/api/chat", json={"message": "hi", "model": "anthropic/claude-fake-1"})
    assert response.status_code == 429
    assert response.json()["type"] == "spend_limit_reached"
    assert "retry-after" not in response.headers


def test_rate_limit_once_the_stream_is_open_is_an_error_event(
    client: TestClient, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(status=429, headers={"retry-after": "5"}))
    events = stream_chat(client, message="hi")
    assert [name for name, _ in events] == ["start", "error"]
    assert events[-1][1]["error"]["type"] == "rate_limited"


def test_the_server_stays_responsive_while_a_provider_stalls(
    make_client: Callable[..., TestClient], upstream: FakeUpstream
) -> None:
    client = make_client(CHAT_STREAM_IDLE_TIMEOUT=20)
    upstream.script(Reply(mode="stall_mid", text="a b c d"))
    results: list[Any] = []
    stalled = threading.Thread(target=lambda: results.append(stream_chat(client, message="stall")))
    stalled.start()
    deadline = time.monotonic() + 30
    while not upstream.requests and time.monotonic() < deadline:  # the stall has begun
        time.sleep(0.01)
    assert client.get("/api/health").status_code == 200
    assert client.post("/api/chat", json={"message": "meanwhile"}).status_code == 200
    assert stalled.is_alive()  # answered while the stall went on: not stuck behind it
    stalled.join(timeout=60)
    assert results[0][-1][1]["error"]["type"] == "provider_timeout"


# --- disk faults, injected at the os call boundary (everything runs as root here) ---------------


@pytest.mark.parametrize(
    ("code", "status", "kind"), [(errno.ENOSPC, 507, "storage_full"), (errno.EIO, 500, "storage_error")]
)
def test_a_disk_error_fails_the_request_cleanly_and_keeps_the_old_file(
    client: TestClient, data_dir: Path, monkeypatch: pytest.MonkeyPatch, code: int, status: int, kind: str
) -> None:
    victim = client.post("/api/chat", json={"message": "first"}).json()["conversation_id"]
    bystander = client.post("/api/chat", json={"message": "other"}).json()["conversation_id"]
    path = data_dir / "conversations" / f"{victim}.json"
    before = path.read_bytes()
    fail_writes_containing(monkeypatch, b'"doomed"', code)
    response = client.post("/api/chat", json={"message": "doomed", "conversation_id": victim})
    assert response.status_code == status
    assert response.json()["type"] == kind
    assert os.strerror(code) in response.json()["detail"]
    assert path.read_bytes() == before
    assert json.loads(before)["messages"][-1]["content"] == "You said: first"
    assert client.post("/api/chat", json={"message": "fine", "conversation_id": bystander}).status_code == 200
    monkeypatch.undo()
    assert client.post("/api/chat", json={"message": "again", "conversation_id": victim}).status_code == 200


def test_a_failed_reply_save_is_a_507_without_streaming(
    client: TestClient, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.script(Reply(text="unsaveable answer"))
    fail_writes_containing(monkeypatch, b"unsaveable answer", errno.ENOSPC)
    response = client.post("/api/chat", json={"message": "go"})
    assert response.status_code == 507
    assert response.json()["type"] == "storage_full"


def test_a_failed_reply_save_is_an_error_event(
    client: TestClient, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.script(Reply(text="unsaveable answer"))
    fail_writes_containing(monkeypatch, b"unsaveable answer", errno.ENOSPC)
    events = stream_chat(client, message="go")
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "storage_full"
    monkeypatch.undo()
    saved = client.get(f"/api/conversations/{events[0][1]['conversation_id']}").json()["messages"]
    assert saved[-1]["status"] == "incomplete"  # the placeholder: never acknowledged as done


def test_a_corrupt_file_does_not_break_the_listing_or_other_conversations(
    client: TestClient, data_dir: Path
) -> None:
    good = client.post("/api/chat", json={"message": "good"}).json()["conversation_id"]
    bad = client.post("/api/chat", json={"message": "bad"}).json()["conversation_id"]
    path = data_dir / "conversations" / f"{bad}.json"
    path.write_bytes(path.read_bytes()[:50])
    response = client.get(f"/api/conversations/{bad}")
    assert response.status_code == 409
    assert response.json()["type"] == "conversation_unreadable"
    assert client.post("/api/chat", json={"message": "more", "conversation_id": good}).status_code == 200
    listing = client.get("/api/conversations")
    assert listing.status_code == 200
    assert good in [item["id"] for item in listing.json()["items"]]
    assert path.read_bytes()[:10] == b'{\n  "schem'


def test_a_chat_during_shutdown_is_refused_before_anything_is_written(
    client: TestClient, upstream: FakeUpstream, data_dir: Path
) -> None:
    client.app.state.generations.stop_all()  # type: ignore[attr-defined]  # what Ctrl-C does first
    response = client.post("/api/chat", json={"message": "too late"})
    assert response.status_code == 503
    assert response.json()["type"] == "server_shutdown"
    assert list((data_dir / "conversations").glob("*.json")) == []
    assert upstream.requests == []
