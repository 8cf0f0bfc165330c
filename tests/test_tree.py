"""The conversation as a tree, through the HTTP API: regenerate, edit, switch, and safe retries."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import stream_chat
from tests.fake_upstream import FakeUpstream, Reply


def chat(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/api/chat", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def post(client: TestClient, conversation_id: str, message_id: str, action: str, **body: Any) -> Any:
    return client.post(f"/api/conversations/{conversation_id}/messages/{message_id}/{action}", json=body)


def get(client: TestClient, conversation_id: str) -> dict[str, Any]:
    response = client.get(f"/api/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def sent(upstream: FakeUpstream, index: int = -1) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in upstream.requests[index].body["messages"]]


def test_regenerate_adds_a_sibling_reply_and_keeps_the_old(
    client: TestClient, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(text="first version"), Reply(text="second version"))
    first = chat(client, message="Tell me a joke")
    conversation_id, old = first["conversation_id"], first["message"]
    response = post(client, conversation_id, old["id"], "regenerate", temperature=1.5)
    assert response.status_code == 200, response.text
    new = response.json()["message"]
    assert new["content"] == "second version"
    assert new["parent_id"] == old["parent_id"]
    assert new["params"]["temperature"] == 1.5
    assert new["sibling_ids"] == [old["id"], new["id"]]
    assert sent(upstream) == [("user", "Tell me a joke")]  # never the old reply
    conversation = get(client, conversation_id)
    assert [m["content"] for m in conversation["messages"]] == ["Tell me a joke", "second version"]
    assert conversation["messages"][1] == new
    assert conversation["messages"][0]["sibling_ids"] == [old["parent_id"]]
    tree = client.get(f"/api/conversations/{conversation_id}/tree").json()
    assert tree["current_id"] == new["id"]
    assert [m["content"] for m in tree["messages"]] == ["Tell me a joke", "first version", "second version"]


def test_regenerate_after_an_error_sends_a_clean_history(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(text="ok"), Reply(status=400, error_message="bad"), Reply(text="better"))
    first = chat(client, message="one")
    failed = client.post("/api/chat", json={"message": "two", "conversation_id": first["conversation_id"]})
    assert failed.status_code == 400
    failed_reply = failed.json()["message"]
    assert (failed_reply["status"], failed_reply["content"]) == ("error", "")
    events = stream_chat_regenerate(client, first["conversation_id"], failed_reply["id"])
    assert events[-1][0] == "done"
    assert events[-1][1]["message"]["content"] == "better"
    assert sent(upstream) == [("user", "one"), ("assistant", "ok"), ("user", "two")]


def stream_chat_regenerate(client: TestClient, conversation_id: str, message_id: str) -> list[Any]:
    from tests.conftest import parse_events

    url = f"/api/conversations/{conversation_id}/messages/{message_id}/regenerate"
    with client.stream("POST", url, json={"stream": True}) as response:
        assert response.status_code == 200
        return parse_events(response.read().decode())


def test_edit_makes_a_new_branch_and_the_old_stays_whole(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(text="A1"), Reply(text="A2"), Reply(text="B1"))
    first = chat(client, message="Q1")
    conversation_id = first["conversation_id"]
    chat(client, message="Q2", conversation_id=conversation_id)
    q1 = first["message"]["parent_id"]
    response = post(client, conversation_id, q1, "edit", message="Q1 edited")
    assert response.status_code == 200, response.text
    assert sent(upstream) == [("user", "Q1 edited")]
    conversation = get(client, conversation_id)
    assert [(m["role"], m["content"]) for m in conversation["messages"]] == [
        ("user", "Q1 edited"),
        ("assistant", "B1"),
    ]  # never two user messages in a row
    edited = conversation["messages"][0]
    assert edited["sibling_ids"] == [q1, edited["id"]]
    tree = client.get(f"/api/conversations/{conversation_id}/tree").json()
    assert [m["content"] for m in tree["messages"]] == ["Q1", "A1", "Q2", "A2", "Q1 edited", "B1"]
    # switching back to the first version brings back the turns that followed it
    updated_at = conversation["updated_at"]
    switched = client.patch(f"/api/conversations/{conversation_id}", json={"current_id": q1})
    assert switched.status_code == 200, switched.text
    assert [m["content"] for m in switched.json()["messages"]] == ["Q1", "A1", "Q2", "A2"]
    assert switched.json()["updated_at"] == updated_at  # flipping versions keeps its place in the list
    assert get(client, conversation_id)["messages"][0]["sibling_ids"] == [q1, edited["id"]]
    # a chat continues from the branch shown
    chat(client, message="Q3", conversation_id=conversation_id)
    assert sent(upstream)[:4] == [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]


def test_unknown_and_wrong_messages_are_refused_before_anything_is_written(
    client: TestClient, upstream: FakeUpstream
) -> None:
    first = chat(client, message="hi")
    other = chat(client, message="elsewhere")
    conversation_id, reply = first["conversation_id"], first["message"]
    before = client.get(f"/api/conversations/{conversation_id}/tree").json()
    cases = [
        (post(client, conversation_id, reply["parent_id"], "regenerate"), 400, "wrong_message_role"),
        (post(client, conversation_id, reply["id"], "edit", message="x"), 400, "wrong_message_role"),
        (post(client, conversation_id, "0" * 32, "regenerate"), 404, "message_not_found"),
        (post(client, conversation_id, other["message"]["id"], "regenerate"), 404, "message_not_found"),
        (post(client, conversation_id, "not-an-id", "stop"), 404, "message_not_found"),
        (
            client.patch(f"/api/conversations/{conversation_id}", json={"current_id": "f" * 32}),
            404,
            "message_not_found",
        ),
        (post(client, "0" * 32, reply["id"], "regenerate"), 404, "conversation_not_found"),
    ]
    for response, status, kind in cases:
        assert (response.status_code, response.json()["type"]) == (status, kind), response.text
    assert "regenerate" in cases[0][0].json()["detail"] and "edit" in cases[1][0].json()["detail"]
    assert client.get(f"/api/conversations/{conversation_id}/tree").json() == before


def test_a_repeated_client_message_id_answers_the_same_turn(
    client: TestClient, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(text="only once"), Reply(text="second"), Reply(text="regenerated"), Reply(text="x"))
    conversation_id = client.post("/api/conversations", json={}).json()["id"]
    body = {"message": "pay the invoice", "conversation_id": conversation_id, "client_message_id": "req-1"}
    first, again = chat(client, **body), chat(client, **body)
    assert again == first
    events = stream_chat(client, **body)
    assert events[-1][1]["message"] == first["message"]
    assert len(upstream.requests) == 1
    conversation = get(client, conversation_id)
    assert len(conversation["messages"]) == 2
    assert conversation["messages"][0]["client_message_id"] == "req-1"

    reply_id = first["message"]["id"]
    regenerated = [
        post(client, conversation_id, reply_id, "regenerate", client_message_id="req-2") for _ in "ab"
    ]
    assert regenerated[0].json() == regenerated[1].json()
    assert regenerated[0].json()["message"]["content"] == "second"
    user_id = first["message"]["parent_id"]
    edits = [
        post(client, conversation_id, user_id, "edit", message="new", client_message_id="req-3") for _ in "ab"
    ]
    assert edits[0].json() == edits[1].json()
    assert len(client.get(f"/api/conversations/{conversation_id}/tree").json()["messages"]) == 5
    too_long = client.post("/api/chat", json={**body, "client_message_id": "x" * 65})
    assert too_long.status_code == 422


def test_the_history_is_fitted_into_a_small_context_window(make_client: Any, upstream: FakeUpstream) -> None:
    """llama.cpp's /props says 2,048 tokens; the fake refuses anything longer, as the real one does."""
    upstream.context_window = 2048
    client = make_client()
    conversation_id = client.post("/api/conversations", json={"model": "lmstudio/tiny"}).json()["id"]
    paragraph = "words that fill the window " * 40  # ~270 tokens a message
    for n in range(12):
        upstream.script(Reply(text=f"answer {n}"))
        reply = chat(client, message=f"{n}: {paragraph}", conversation_id=conversation_id)["message"]
        assert reply["status"] == "complete"
    assert reply["messages_left_out"] > 0
    assert sent(upstream)[-1] == ("user", f"11: {paragraph}")
    assert sent(upstream)[0][0] == "user"
    assert len(sent(upstream)) == 2 * 12 - 1 - reply["messages_left_out"]
    assert len(upstream.probes) == 1  # asked once, then known

    too_big = client.post("/api/chat", json={"message": "word " * 9000, "conversation_id": conversation_id})
    assert too_big.status_code == 400
    assert too_big.json()["type"] == "context_too_long"
    assert "2048" in too_big.json()["detail"]
    assert len(get(client, conversation_id)["messages"]) == 24  # nothing was written


def test_two_hundred_turns_with_a_2048_token_server_keep_working(
    make_client: Any, upstream: FakeUpstream
) -> None:
    upstream.context_window = 2048
    client = make_client(
        CHAT_SERVERS={"llama": {"base_url": upstream.openai_base_url, "context_tokens": 2048}}
    )
    conversation_id = client.post("/api/conversations", json={"model": "llama/small"}).json()["id"]
    for n in range(200):
        upstream.script(Reply(text=f"reply number {n} " * 10))
        reply = chat(client, message=f"turn {n} " * 12, conversation_id=conversation_id)["message"]
        assert reply["status"] == "complete", reply
    assert upstream.probes == []  # context_tokens from CHAT_SERVERS: nothing to ask
    assert reply["messages_left_out"] > 300


def test_ollama_reports_its_window_through_api_show(make_client: Any, upstream: FakeUpstream) -> None:
    upstream.ollama_context = 512
    client = make_client()
    response = client.post("/api/chat", json={"message": "word " * 600, "model": "ollama/llama3.2"})
    assert response.status_code == 400
    assert response.json()["type"] == "context_too_long"
    assert [p.path for p in upstream.probes] == ["/props", "/api/show"]
    assert upstream.probes[1].body == {"model": "llama3.2"}
    assert client.get("/api/conversations").json()["items"] == []


def test_a_title_is_asked_of_the_title_model_in_the_background(
    make_client: Any, upstream: FakeUpstream
) -> None:
    client = make_client(CHAT_TITLE_MODEL="openai/fake-gpt-2")
    upstream.script(Reply(text="Paris it is."), Reply(text='"Trip to Paris."\nmore'))
    first = chat(client, message="Where should I go this spring? Somewhere with museums")
    assert first["message"]["content"] == "Paris it is."
    conversation_id = first["conversation_id"]
    assert wait_until(lambda: get(client, conversation_id)["title"] == "Trip to Paris")
    assert upstream.requests[1].body["model"] == "fake-gpt-2"

    mine = client.post("/api/conversations", json={"title": "My own"}).json()["id"]
    upstream.script(Reply(text="sure"), Reply(text="Generated"))
    chat(client, message="hello", conversation_id=mine)
    assert upstream.wait_requests(4)
    assert wait_until(lambda: not client.app.state.generations.running)
    assert get(client, mine)["title"] == "My own"

    upstream.script(Reply(text="fine"), Reply(status=400))
    failing = chat(client, message="a title that stays")["conversation_id"]
    assert upstream.wait_requests(6)
    assert wait_until(lambda: not client.app.state.generations.running)
    assert get(client, failing)["title"] == "a title that stays"


def wait_until(condition: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_reply_not_running_answers_its_saved_state(client: TestClient, upstream: FakeUpstream) -> None:
    upstream.script(Reply(text="héllo 👋 wörld"))
    first = chat(client, message="hi")
    conversation_id, reply = first["conversation_id"], first["message"]
    stopped = post(client, conversation_id, reply["id"], "stop")
    assert stopped.status_code == 200
    assert stopped.json() == first  # unchanged: stop is idempotent
    url = f"/api/conversations/{conversation_id}/messages/{reply['id']}/stream"
    from tests.conftest import parse_events

    with client.stream("GET", url, headers={"Last-Event-ID": "6"}, params={"after": 0}) as response:
        assert response.status_code == 200
        body = response.read().decode()
    events = parse_events(body)
    assert [name for name, _ in events] == ["start", "delta", "done"]
    assert events[1][1]["text"] == "👋 wörld"  # the header wins over ?after=
    assert "id: 13\n" in body  # code points, not bytes or UTF-16 units
    assert events[2][1]["message"] == reply
    past = client.get(url, headers={"Last-Event-ID": "14"})
    assert (past.status_code, past.json()["type"]) == (400, "invalid_event_id")
    assert client.get(url, params={"after": 99}).status_code == 400
