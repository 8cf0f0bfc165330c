"""Functional tests through the HTTP API, with the real SDKs talking to the fake upstream."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient

from tests.conftest import stream_chat
from tests.fake_upstream import FakeUpstream, Reply


def chat(client: TestClient, **body: Any) -> Any:
    response = client.post("/api/chat", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# --- chatting -----------------------------------------------------------------------------------


def test_chat_starts_a_conversation_and_saves_both_messages(
    client: TestClient, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(text="Hello there, friend.", usage=(7, 4)))
    body = chat(client, message="Hi!")
    reply = body["message"]
    assert reply["role"] == "assistant"
    assert reply["content"] == "Hello there, friend."
    assert reply["status"] == "complete"
    assert reply["finish_reason"] == "stop"
    assert reply["usage"] == {"input_tokens": 7, "output_tokens": 4}
    assert reply["model"] == "openai/fake-gpt-1"
    assert reply["error"] is None

    conversation = client.get(f"/api/conversations/{body['conversation_id']}").json()
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    assert conversation["messages"][0]["content"] == "Hi!"
    assert conversation["messages"][1] == reply
    assert conversation["messages"][1]["parent_id"] == conversation["messages"][0]["id"]
    assert conversation["current_id"] == reply["id"]
    assert conversation["title"] == "Hi!"
    assert conversation["model"] == "openai/fake-gpt-1"


def test_history_is_sent_upstream_on_the_next_turn(client: TestClient, upstream: FakeUpstream) -> None:
    first = chat(client, message="My name is Ada.", system="Be brief.")
    chat(client, message="What is my name?", conversation_id=first["conversation_id"])
    sent = upstream.requests[-1].body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "You said: My name is Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


def test_new_conversation_keeps_its_settings_and_a_turn_override_applies_once(
    client: TestClient, upstream: FakeUpstream
) -> None:
    first = chat(client, message="one", model="lmstudio/local-model", temperature=0.2, max_tokens=50)
    conversation_id = first["conversation_id"]
    assert upstream.requests[-1].body["model"] == "local-model"
    assert upstream.requests[-1].body["temperature"] == 0.2
    assert upstream.requests[-1].body["max_tokens"] == 50

    second = chat(
        client, message="two", conversation_id=conversation_id, model="openai/fake-gpt-2", temperature=1.0
    )
    assert upstream.requests[-1].body["model"] == "fake-gpt-2"
    assert upstream.requests[-1].body["temperature"] == 1.0
    assert upstream.requests[-1].body["max_completion_tokens"] == 50  # OpenAI's own name for it
    assert second["message"]["model"] == "openai/fake-gpt-2"
    assert second["message"]["params"] == {"temperature": 1.0, "max_tokens": 50}

    chat(client, message="three", conversation_id=conversation_id)
    assert upstream.requests[-1].body["model"] == "local-model"
    assert upstream.requests[-1].body["temperature"] == 0.2
    conversation = client.get(f"/api/conversations/{conversation_id}").json()
    assert conversation["model"] == "lmstudio/local-model"
    assert conversation["params"] == {"temperature": 0.2, "max_tokens": 50}


def test_anthropic_gets_system_on_top_and_max_tokens(client: TestClient, upstream: FakeUpstream) -> None:
    body = chat(client, message="Hello", model="anthropic/claude-fake-1", system="You are terse.")
    assert body["message"]["content"] == "You said: Hello"
    sent = upstream.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.body["system"] == "You are terse."
    assert sent.body["max_tokens"] == 4096
    assert "temperature" not in sent.body
    assert sent.body["messages"] == [{"role": "user", "content": "Hello"}]


def test_anthropic_temperature_goes_through_and_a_rejection_is_a_400(
    client: TestClient, upstream: FakeUpstream
) -> None:
    chat(client, message="Hello", model="anthropic/claude-fake-1", temperature=0.5)
    assert upstream.requests[-1].body["temperature"] == 0.5
    response = client.post(
        "/api/chat", json={"message": "Hi", "model": "anthropic/claude-fake-1", "temperature": 1.5}
    )
    assert response.status_code == 400
    assert response.json()["type"] == "provider_rejected"
    assert "temperature" in response.json()["detail"]


def test_after_a_failed_reply_anthropic_still_gets_a_clean_history(
    client: TestClient, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(status=529), Reply(status=529))  # the first try and the one retry
    failed = client.post("/api/chat", json={"message": "first", "model": "anthropic/claude-fake-1"})
    assert failed.status_code == 502
    assert failed.json()["type"] == "provider_unavailable"
    conversation_id = failed.json()["conversation_id"]
    assert failed.json()["message"]["status"] == "error"

    body = chat(client, message="second", conversation_id=conversation_id)
    assert body["message"]["status"] == "complete"
    assert upstream.requests[-1].body["messages"] == [{"role": "user", "content": "first\n\nsecond"}]
    roles = [m["role"] for m in client.get(f"/api/conversations/{conversation_id}").json()["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_streaming_sends_start_deltas_and_done(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(text="one two three four", chunks=4))
    events = stream_chat(client, message="count")
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done"
    assert set(names[1:-1]) == {"delta"}
    start, done = events[0][1], events[-1][1]
    assert "".join(data["text"] for name, data in events if name == "delta") == "one two three four"
    assert done["message"]["content"] == "one two three four"
    assert done["message"]["id"] == start["message_id"]
    assert done["message"]["status"] == "complete"
    saved = client.get(f"/api/conversations/{start['conversation_id']}").json()["messages"]
    assert [m["id"] for m in saved] == [start["user_message_id"], start["message_id"]]
    assert saved[1] == done["message"]


def test_streaming_with_anthropic(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(text="Bonjour tout le monde", usage=(3, 4)))
    events = stream_chat(client, message="hi", model="anthropic/claude-fake-2")
    done = events[-1][1]["message"]
    assert done["content"] == "Bonjour tout le monde"
    assert done["finish_reason"] == "end_turn"
    assert done["usage"] == {"input_tokens": 3, "output_tokens": 4}


def test_streaming_error_event_keeps_the_partial_reply(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(text="a b c d e f", chunks=6, mode="midstream_error"))
    events = stream_chat(client, message="go", model="anthropic/claude-fake-1")
    name, data = events[-1]
    assert name == "error"
    assert data["error"]["type"] == "provider_unavailable"
    assert data["message"]["status"] == "error"
    assert data["message"]["content"] == "a b c "
    conversation = client.get(f"/api/conversations/{events[0][1]['conversation_id']}").json()
    assert conversation["messages"][-1] == data["message"]


def test_validation_happens_before_the_stream_opens(client: TestClient) -> None:
    response = client.post("/api/chat", json={"message": "x", "model": "nobody/model", "stream": True})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["type"] == "unknown_provider"


# --- provider errors as the API reports them ----------------------------------------------------

ERROR_CASES: list[tuple[list[Reply], int, str]] = [
    (
        [Reply(status=400, error_message="This model's maximum context length is 8192 tokens")],
        400,
        "provider_rejected",
    ),
    ([Reply(status=401)], 502, "provider_auth_failed"),
    ([Reply(status=403)], 502, "provider_auth_failed"),
    ([Reply(status=429, headers={"retry-after": "7"})], 429, "rate_limited"),
    ([Reply(status=500), Reply(status=500)], 502, "provider_unavailable"),
    ([Reply(mode="malformed")], 502, "provider_malformed_reply"),
    ([Reply(mode="drop_mid", text="a b c d")], 502, "provider_unavailable"),
    ([Reply(mode="stall_headers")], 504, "provider_timeout"),
]


def test_provider_errors_map_to_documented_statuses(client: TestClient, upstream: FakeUpstream) -> None:
    for replies, status, kind in ERROR_CASES:
        upstream.script(*replies)
        response = client.post("/api/chat", json={"message": "hello"})
        assert response.status_code == status, (replies, response.text)
        body = response.json()
        assert body["type"] == kind
        assert body["message"]["status"] == "error"
        assert body["message"]["error"]["type"] == kind
        assert body["detail"]
    upstream.script(Reply(status=429, headers={"retry-after": "7"}))
    response = client.post("/api/chat", json={"message": "hello"})
    assert response.headers["retry-after"] == "7"


def test_context_too_long_message_is_passed_on(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(status=400, error_message="maximum context length is 8192 tokens"))
    response = client.post("/api/chat", json={"message": "hello"})
    assert response.status_code == 400
    assert "maximum context length is 8192 tokens" in response.json()["detail"]


def test_unknown_model_is_a_404(client: TestClient) -> None:
    response = client.post("/api/chat", json={"message": "hello", "model": "openai/gpt-missing"})
    assert response.status_code == 404
    assert response.json()["type"] == "model_not_found"
    assert "gpt-missing" in response.json()["detail"]


def test_a_provider_without_a_key_names_the_variable(make_client: Callable[..., TestClient]) -> None:
    client = make_client(OPENAI_API_KEY=None, CHAT_DEFAULT_MODEL=None)
    response = client.post("/api/chat", json={"message": "hello", "model": "openai/gpt-4o"})
    assert response.status_code == 400
    assert response.json() == {
        "detail": "openai is not configured: set the OPENAI_API_KEY environment variable",
        "type": "provider_not_configured",
    }


def test_history_leaves_out_failed_empty_replies(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(status=401))
    failed = client.post("/api/chat", json={"message": "first"})
    conversation_id = failed.json()["conversation_id"]
    chat(client, message="second", conversation_id=conversation_id)
    assert upstream.requests[-1].body["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
    ]


# --- conversations ------------------------------------------------------------------------------


def test_conversation_crud(client: TestClient) -> None:
    created = client.post(
        "/api/conversations",
        json={
            "title": "Plans",
            "model": "anthropic/claude-fake-1",
            "system": "Be kind.",
            "params": {"temperature": 0.3},
        },
    )
    assert created.status_code == 201
    conversation = created.json()
    assert conversation["title"] == "Plans"
    assert conversation["messages"] == []
    assert conversation["params"] == {"temperature": 0.3, "max_tokens": None}

    patched = client.patch(
        f"/api/conversations/{conversation['id']}", json={"title": "Trips", "system": None}
    )
    assert patched.status_code == 200
    assert patched.json()["title"] == "Trips"
    assert patched.json()["system"] is None
    assert patched.json()["model"] == "anthropic/claude-fake-1"

    assert client.delete(f"/api/conversations/{conversation['id']}").status_code == 204
    missing = client.get(f"/api/conversations/{conversation['id']}")
    assert missing.status_code == 404
    assert missing.json()["type"] == "conversation_not_found"
    assert client.delete(f"/api/conversations/{conversation['id']}").status_code == 404


def test_patch_merges_params_and_an_empty_patch_writes_nothing(client: TestClient, data_dir: Path) -> None:
    conversation = client.post(
        "/api/conversations", json={"params": {"temperature": 0.4, "max_tokens": 99}}
    ).json()
    patched = client.patch(f"/api/conversations/{conversation['id']}", json={"params": {"max_tokens": 10}})
    assert patched.json()["params"] == {"temperature": 0.4, "max_tokens": 10}
    path = data_dir / "conversations" / f"{conversation['id']}.json"
    before = path.read_bytes()
    unchanged = client.patch(f"/api/conversations/{conversation['id']}", json={})
    assert unchanged.status_code == 200
    assert unchanged.json() == patched.json()
    assert path.read_bytes() == before


def test_patch_with_nulls_leaves_fields_as_they_are(client: TestClient) -> None:
    conversation = client.post("/api/conversations", json={"title": "Kept", "system": "Be nice."}).json()
    patched = client.patch(
        f"/api/conversations/{conversation['id']}",
        json={"title": None, "model": None, "params": None, "system": None},
    )
    assert patched.status_code == 200
    assert patched.json()["title"] == "Kept"
    assert patched.json()["model"] == conversation["model"]
    assert patched.json()["params"] == conversation["params"]
    assert patched.json()["system"] is None  # the one field null clears


def test_an_unreadable_file_is_a_clear_storage_error(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversation_id = chat(client, message="hi")["conversation_id"]

    def denied(self: Path) -> bytes:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    response = client.get(f"/api/conversations/{conversation_id}")
    assert response.status_code == 500
    assert response.json()["type"] == "storage_error"
    assert response.json()["detail"].startswith(
        f"could not read conversation {conversation_id}: Permission denied"
    )


def test_a_file_of_the_wrong_shape_is_a_409_everywhere_and_left_out_of_the_listing(
    make_client: Callable[..., TestClient], data_dir: Path
) -> None:
    client = make_client()
    good = chat(client, message="fine")["conversation_id"]
    bad = chat(client, message="soon broken")["conversation_id"]
    path = data_dir / "conversations" / f"{bad}.json"
    doc = json.loads(path.read_text())
    del doc["messages"]  # made every listing, and GET/chat/PATCH on it, answer 500
    path.write_text(json.dumps(doc))
    before = path.read_bytes()
    client = make_client()  # a restart: the listing is built from the files
    listing = client.get("/api/conversations")
    assert listing.status_code == 200, listing.text
    assert [c["id"] for c in listing.json()["items"]] == [good]
    assert client.get("/api/health").json()["unreadable_conversations"] == [bad]
    for response in (
        client.get(f"/api/conversations/{bad}"),
        client.post("/api/chat", json={"message": "more", "conversation_id": bad}),
        client.patch(f"/api/conversations/{bad}", json={"title": "x"}),
    ):
        assert response.status_code == 409, response.text
        assert response.json()["type"] == "conversation_unreadable"
        assert "messages: Field required" in response.json()["detail"]
    assert path.read_bytes() == before


def test_unknown_ids_leave_no_files_behind(client: TestClient, data_dir: Path) -> None:
    unknown = "0" * 32
    for method in ("GET", "PATCH", "DELETE"):
        assert client.request(method, f"/api/conversations/{unknown}", json={"title": "x"}).status_code == 404
    assert client.post("/api/chat", json={"message": "hi", "conversation_id": unknown}).status_code == 404
    for malformed in ("", "x" * 65):  # one answer for any id that is not one: as for an unknown id
        response = client.post("/api/chat", json={"message": "hi", "conversation_id": malformed})
        assert response.status_code == 404
        assert response.json()["type"] == "conversation_not_found"
    assert list((data_dir / "conversations").iterdir()) == []


def test_patch_refuses_an_unknown_provider(client: TestClient) -> None:
    conversation = client.post("/api/conversations", json={}).json()
    response = client.patch(f"/api/conversations/{conversation['id']}", json={"model": "nope/x"})
    assert response.status_code == 400
    assert response.json()["type"] == "unknown_provider"


def test_listing_pages_newest_first(client: TestClient) -> None:
    ids = [client.post("/api/conversations", json={"title": f"c{i}"}).json()["id"] for i in range(5)]
    chat(client, message="bump", conversation_id=ids[1])  # now the most recently updated
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/api/conversations", params=params)
        assert page.status_code == 200
        seen += [item["id"] for item in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [ids[1], ids[4], ids[3], ids[2], ids[0]]
    item = client.get("/api/conversations", params={"limit": 1}).json()["items"][0]
    assert set(item) == {"id", "title", "created_at", "updated_at", "model", "message_count", "totals"}
    assert item["message_count"] == 2


def test_bad_cursor_and_limit_are_4xx(client: TestClient) -> None:
    assert client.get("/api/conversations", params={"cursor": "!!!"}).status_code == 400
    assert client.get("/api/conversations", params={"limit": 0}).status_code == 422
    assert client.get("/api/conversations", params={"limit": "many"}).status_code == 422


def test_two_turns_at_once_both_land_whole(client: TestClient, upstream: FakeUpstream) -> None:
    conversation_id = chat(client, message="start")["conversation_id"]
    upstream.script(Reply(text="slow reply", chunks=5, chunk_delay=0.05), Reply(text="fast reply"))
    results: list[Any] = []

    def send(text: str) -> None:
        results.append(chat(client, message=text, conversation_id=conversation_id))

    threads = [threading.Thread(target=send, args=(text,)) for text in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    messages = client.get(f"/api/conversations/{conversation_id}").json()["messages"]
    assert len(messages) == 6
    by_id = {m["id"]: m for m in messages}
    for result in results:
        reply = by_id[result["message"]["id"]]
        assert reply == result["message"]
        assert by_id[reply["parent_id"]]["role"] == "user"
        assert reply["status"] == "complete"
    assert sorted(m["content"] for m in messages[2:] if m["role"] == "assistant") == [
        "fast reply",
        "slow reply",
    ]


# --- bad input ----------------------------------------------------------------------------------

# each bad body, and where the error must point: the field (or the body itself)
BAD_BODIES: list[tuple[Any, list[Any]]] = [
    ({}, ["body", "message"]),
    ({"message": ""}, ["body", "message"]),
    ({"message": "   \n"}, ["body", "message"]),
    ({"message": 5}, ["body", "message"]),
    ({"message": "hi", "stream": "maybe"}, ["body", "stream"]),
    ({"message": "hi", "temperature": 9}, ["body", "temperature"]),
    ({"message": "hi", "max_tokens": 0}, ["body", "max_tokens"]),
    ({"message": "hi", "model": "no-slash"}, ["body", "model"]),
    ({"message": "hi", "unknown_field": 1}, ["body", "unknown_field"]),
    (["message", "hi"], ["body"]),
    ("just a string", ["body"]),
]


def test_bad_bodies_get_a_422_with_the_field(client: TestClient) -> None:
    for body, where in BAD_BODIES:
        response = client.post("/api/chat", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["type"] == "invalid_request"
        errors = response.json()["detail"]
        assert [e["loc"] for e in errors] == [where], (body, errors)
        assert errors[0]["msg"]


def test_malformed_json_and_wrong_content_are_4xx(client: TestClient) -> None:
    for content in (b"{not json", b"", b"\xff\xfe\x00", b'{"message": "\\ud800"}'):
        response = client.post("/api/chat", content=content, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (content, response.text)
        assert "detail" in response.json()


def test_unknown_and_malformed_ids_are_404(client: TestClient) -> None:
    for path in ("0" * 32, "../../etc/passwd", "ABC", "%2e%2e%2fsecret", "a" * 300):
        response = client.get(f"/api/conversations/{path}")
        assert response.status_code == 404, path
        assert response.json()["type"] in ("conversation_not_found", "not_found")
    response = client.post("/api/chat", json={"message": "hi", "conversation_id": "../x"})
    assert response.status_code == 404


def test_unknown_route_and_method(client: TestClient) -> None:
    assert client.get("/api/nope").json() == {
        "detail": "no route GET /api/nope; see /docs for the API",
        "type": "not_found",
    }
    response = client.put("/api/chat", json={})
    assert response.status_code == 405
    assert response.json()["type"] == "method_not_allowed"


# --- service routes -----------------------------------------------------------------------------


def test_health(client: TestClient) -> None:
    response = client.get("/api/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "version": "0.1.0",
        "data_dir_writable": True,
        "providers": {
            name: {"configured": True, "reachable": None}
            for name in ("openai", "anthropic", "ollama", "lmstudio")
        },
        "unreadable_conversations": [],
    }


def test_health_says_which_providers_answered_without_asking_them(
    make_client: Callable[..., TestClient], upstream: FakeUpstream
) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    client = make_client(OLLAMA_BASE_URL=nowhere, ANTHROPIC_API_KEY=None)
    requests_before = len(upstream.requests)
    providers = client.get("/api/health").json()["providers"]
    assert len(upstream.requests) == requests_before  # health asks nobody
    assert providers["ollama"] == {"configured": True, "reachable": None}
    assert providers["anthropic"] == {"configured": False, "reachable": None}
    assert client.get("/api/models").status_code == 200
    providers = client.get("/api/health").json()["providers"]
    assert providers["ollama"] == {"configured": True, "reachable": False}
    assert providers["openai"] == {"configured": True, "reachable": True}
    assert providers["anthropic"] == {"configured": False, "reachable": None}
    response = client.post("/api/chat", json={"message": "hi", "model": "ollama/llama3.2"})
    assert response.status_code == 502
    assert client.get("/api/health").json()["providers"]["ollama"]["reachable"] is False


def test_models_lists_upstream_models_and_falls_back(
    make_client: Callable[..., TestClient], upstream: FakeUpstream
) -> None:
    client = make_client(OPENAI_API_KEY=None)
    body = client.get("/api/models").json()
    assert body["default_model"] == "openai/fake-gpt-1"
    by_name = {p["name"]: p for p in body["providers"]}
    assert by_name["openai"] == {
        "name": "openai",
        "configured": False,
        "hint": "set OPENAI_API_KEY to use openai",
        "models": [],
        "models_source": "none",
    }
    assert by_name["anthropic"]["models"] == ["claude-fake-1", "claude-fake-2"]
    assert by_name["ollama"]["models"] == ["fake-gpt-1", "fake-gpt-2"]
    assert by_name["ollama"]["models_source"] == "upstream"

    upstream.models_status = 500
    try:
        fresh = make_client(OPENAI_API_KEY=None)
        ollama = {p["name"]: p for p in fresh.get("/api/models").json()["providers"]}["ollama"]
    finally:
        upstream.models_status = 200
    assert ollama["models_source"] == "fallback"
    assert "llama3.2" in ollama["models"]


def test_default_model_is_picked_from_configured_providers(make_client: Callable[..., TestClient]) -> None:
    only_anthropic = make_client(OPENAI_API_KEY=None, CHAT_DEFAULT_MODEL=None)
    assert only_anthropic.get("/api/models").json()["default_model"] == "anthropic/claude-sonnet-4-6"
    nothing = make_client(
        OPENAI_API_KEY=None,
        ANTHROPIC_API_KEY=None,
        CHAT_DEFAULT_MODEL=None,
        OLLAMA_BASE_URL=nowhere(),
        CHAT_SERVERS={},
    )
    default_found(nothing)
    assert nothing.get("/api/models").json()["default_model"] == "ollama/llama3.2"


def nowhere() -> str:
    """An OpenAI-compatible URL nothing listens on."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{closed.getsockname()[1]}/v1"


def default_found(client: TestClient) -> None:
    """Wait until the app has asked the local servers for a default model."""
    app: Any = client.app

    async def settled() -> None:
        await asyncio.wait([app.state.finding_default], timeout=60)

    assert client.portal is not None
    client.portal.call(settled)
    assert app.state.finding_default.done()


def test_with_only_local_servers_the_default_is_the_first_chat_model_they_list(
    make_client: Callable[..., TestClient], upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.openai_models = ("all-minilm", "nomic-embed-text", "qwen2.5")
    upstream.capabilities = {
        "all-minilm": ["embedding"],
        "nomic-embed-text": ["embedding"],
        "qwen2.5": ["completion", "tools"],
    }
    client = make_client(
        OPENAI_API_KEY=None,
        ANTHROPIC_API_KEY=None,
        CHAT_DEFAULT_MODEL=None,
        OLLAMA_BASE_URL=nowhere(),  # the first local server does not answer: the next one is asked
        CHAT_SERVERS={"lmstudio": {"base_url": upstream.base_url}},
    )
    default_found(client)
    assert client.get("/api/models").json()["default_model"] == "lmstudio/qwen2.5"
    assert "default model: lmstudio/qwen2.5 (the first chat model lmstudio lists)" in caplog.text
    reply = chat(client, message="which model?")["message"]  # a chat that names no model
    assert reply["model"] == "lmstudio/qwen2.5"
    assert upstream.requests[-1].body["model"] == "qwen2.5"


def test_openapi_documents_every_route(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    app: Any = client.app
    routes = {  # iter_route_contexts also walks the routers added with include_router
        (str(context.path), method.lower()): context.original_route
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute) and context.original_route.include_in_schema
        for method in context.methods or ()
    }
    documented = {(path, method) for path, item in schema["paths"].items() for method in item}
    assert documented == set(routes)
    for (path, method), route in routes.items():
        operation = schema["paths"][path][method]
        assert operation.get("summary") and operation.get("description"), (path, method)  # the docstring
        success = [code for code in operation["responses"] if code.startswith("2")]
        assert success, (path, method)
        for code in success:
            if code != "204" and path.startswith("/api/"):  # /v1 answers in OpenAI's and Anthropic's shapes
                content = operation["responses"][code]["content"]
                assert any(media.get("schema") for media in content.values()), (path, method, code)
        if path.startswith("/api/"):  # /v1 answers errors in the OpenAI and Anthropic shapes
            error_schema = operation["responses"]["404"]["content"]["application/json"]["schema"]
            assert error_schema["$ref"].endswith("ErrorOut"), (path, method)
        if route.body_field is not None:  # a route that reads a JSON body documents it
            assert operation["requestBody"]["content"]["application/json"]["schema"], (path, method)
    chat_post = schema["paths"]["/api/chat"]["post"]
    assert chat_post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatIn")
    assert "text/event-stream" in chat_post["responses"]["200"]["content"]
    assert client.get("/docs").status_code == 200


def test_a_conversation_is_encoded_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import main

    conversation_id = chat(client, message="hi")["conversation_id"]
    encoded_in: list[threading.Thread] = []
    real = main.encode_view

    def spy(view: dict[str, Any]) -> bytes:
        encoded_in.append(threading.current_thread())
        return real(view)

    monkeypatch.setattr(main, "encode_view", spy)

    async def loop_thread() -> threading.Thread:
        return threading.current_thread()

    response = client.get(f"/api/conversations/{conversation_id}")
    assert response.status_code == 200
    assert [m["content"] for m in response.json()["messages"]] == ["hi", "You said: hi"]
    assert len(encoded_in) == 1
    assert client.portal is not None
    assert encoded_in[0] is not client.portal.call(loop_thread)
