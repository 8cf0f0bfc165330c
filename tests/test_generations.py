"""Generations through a real `python main.py`: re-attach, stop, slow clients, kill -9, two processes."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import parse_events
from tests.fake_upstream import FakeUpstream, Reply
from tests.test_e2e import Service, read_conversation, start_service

EMOJI_TEXT = "".join(f"naïve café {n} 👋🏽 日本語 " for n in range(150))  # multi-byte, astral, ZWJ-free


@pytest.fixture
def service(upstream: FakeUpstream, tmp_path: Path) -> Iterator[Service]:
    running = start_service(upstream, tmp_path / "data", tmp_path / "service.log")
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


class SSE:
    """Reads events one at a time from a streamed response, keeping each event's `id:`."""

    def __init__(self, response: httpx2.Response) -> None:
        self.lines = response.iter_lines()

    def next(self) -> tuple[str, Any, int | None]:
        fields: dict[str, str] = {}
        for line in self.lines:
            if not line:
                if "event" in fields:
                    event_id = int(fields["id"]) if "id" in fields else None
                    return fields["event"], json.loads(fields["data"]), event_id
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        raise AssertionError("the stream ended without another event")


def wait_until(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.02)
    return result


def reply_on_disk(data_dir: Path, conversation_id: str, message_id: str) -> Any:
    messages = read_conversation(data_dir, conversation_id)["messages"]
    return next(m for m in messages if m["id"] == message_id)


def test_reload_mid_reply_and_reattach_gets_every_character_once(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(text=EMOJI_TEXT, chunks=300, chunk_delay=0.01))
    received = ""
    body = {"message": "go", "stream": True, "on_disconnect": "continue"}
    with httpx2.stream("POST", f"{service.url}/api/chat", json=body, timeout=30) as response:
        events = SSE(response)
        name, start, first_id = events.next()
        assert (name, first_id) == ("start", 0)
        for _ in range(5):
            name, data, last_id = events.next()
            assert name == "delta"
            received += data["text"]
            assert last_id == len(received)
    # the page reloads: the connection is gone, the reply goes on
    url = f"{service.url}/api/conversations/{start['conversation_id']}/messages/{start['message_id']}"
    live = httpx2.get(f"{service.url}/api/conversations/{start['conversation_id']}").json()["messages"][-1]
    assert live["status"] == "generating" and EMOJI_TEXT.startswith(live["content"])
    began = time.perf_counter()
    with httpx2.stream(
        "GET", f"{url}/stream", params={"after": 1}, headers={"Last-Event-ID": str(last_id)}, timeout=30
    ) as response:
        assert response.status_code == 200
        events = SSE(response)
        name, again, resumed_at = events.next()
        attach_ms = (time.perf_counter() - began) * 1000
        assert (name, again["message_id"], resumed_at) == ("start", start["message_id"], last_id)
        while True:
            name, data, event_id = events.next()
            if name != "delta":
                break
            received += data["text"]
            assert event_id == len(received)
    assert name == "done"
    assert received == EMOJI_TEXT == data["message"]["content"]
    assert data["message"]["status"] == "complete"
    print(f"\nre-attach to a running reply: first event after {attach_ms:.1f} ms")


def test_stop_during_the_first_token_and_during_the_stream(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.script(Reply(mode="stall_headers"), Reply(text="tick " * 2000, chunk_delay=0.01))
    for index in (0, 1):
        with httpx2.stream(
            "POST", f"{service.url}/api/chat", json={"message": "go", "stream": True}, timeout=30
        ) as response:
            events = SSE(response)
            _, start, _ = events.next()
            if index == 0:
                assert upstream.wait_requests(1)
            else:
                assert events.next()[0] == "delta"
            url = f"{service.url}/api/conversations/{start['conversation_id']}/messages/{start['message_id']}"
            stopped = httpx2.post(f"{url}/stop", timeout=30)
            assert stopped.status_code == 200
            saved = stopped.json()["message"]
            assert (saved["status"], saved["finish_reason"]) == ("incomplete", "stopped")
            assert upstream.wait_closed(index, timeout=30) is not None  # the upstream was closed
            while (event := events.next())[0] == "delta":
                pass
            assert event[0] == "done"
            assert event[1]["message"] == saved
        on_disk = reply_on_disk(tmp_path / "data", start["conversation_id"], start["message_id"])
        assert {**on_disk, "sibling_ids": saved["sibling_ids"]} == saved
        assert ("tick " * 2000).startswith(saved["content"])
        assert bool(saved["content"]) == (index == 1)
        assert httpx2.post(f"{url}/stop", timeout=30).json()["message"] == saved  # idempotent


def test_a_client_that_stops_reading_does_not_delay_the_save(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    text = "x" * 99 + " "
    upstream.script(Reply(text=text * 40_000, chunks=4000))  # 4 MB, much more than socket buffers hold
    with httpx2.stream(
        "POST", f"{service.url}/api/chat", json={"message": "big", "stream": True}, timeout=60
    ) as response:
        events = SSE(response)  # kept: a collected line iterator would close the connection
        _, start, _ = events.next()  # then read nothing more
        reply = wait_until(
            lambda: (
                (r := reply_on_disk(tmp_path / "data", start["conversation_id"], start["message_id"]))
                and r["status"] == "complete"
                and r
            ),
            timeout=60,
        )
        assert len(reply["content"]) == len(text) * 40_000


def test_kill_9_during_a_long_reply_keeps_the_checkpointed_text(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    text = "tock " * 4000
    upstream.script(Reply(text=text, chunk_delay=0.01))
    with httpx2.stream(
        "POST", f"{service.url}/api/chat", json={"message": "long", "stream": True}, timeout=30
    ) as response:
        events = SSE(response)
        _, start, _ = events.next()
        checkpoint = wait_until(
            lambda: (
                (r := reply_on_disk(tmp_path / "data", start["conversation_id"], start["message_id"]))
                and r["content"]
                and r
            )
        )
        service.process.send_signal(signal.SIGKILL)
        service.process.wait()
    after = reply_on_disk(tmp_path / "data", start["conversation_id"], start["message_id"])
    assert (after["status"], after["finish_reason"]) == ("incomplete", None)
    assert after["content"].startswith(checkpoint["content"]) and text.startswith(after["content"])
    assert 0 < len(after["content"]) < len(text)


def test_branches_of_one_conversation_run_at_once_in_two_processes(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = start_service(upstream, data_dir, tmp_path / "one.log")
    second = start_service(upstream, data_dir, tmp_path / "two.log")
    try:
        upstream.script(Reply(text="base answer"))
        base = httpx2.post(f"{first.url}/api/chat", json={"message": "base"}, timeout=30).json()
        conversation_id, reply = base["conversation_id"], base["message"]
        upstream.script(*(Reply(text=f"slow {n} " * 50, chunk_delay=0.002) for n in range(6)))
        prefix = f"/api/conversations/{conversation_id}/messages"
        calls = [
            (first.url, f"{prefix}/{reply['id']}/regenerate", {}),
            (second.url, f"{prefix}/{reply['id']}/regenerate", {}),
            (first.url, f"{prefix}/{reply['parent_id']}/edit", {"message": "edited in one"}),
            (second.url, f"{prefix}/{reply['parent_id']}/edit", {"message": "edited in two"}),
            (first.url, "/api/chat", {"message": "follow-up one", "conversation_id": conversation_id}),
            (second.url, "/api/chat", {"message": "follow-up two", "conversation_id": conversation_id}),
        ]
        answers: list[Any] = []

        def call(url: str, path: str, body: dict[str, Any]) -> None:
            answers.append(httpx2.post(f"{url}{path}", json=body, timeout=60))

        threads = [threading.Thread(target=call, args=c) for c in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
        tree = httpx2.get(f"{second.url}/api/conversations/{conversation_id}/tree").json()
        by_id = {m["id"]: m for m in tree["messages"]}
        assert len(by_id) == 2 + 2 + 4 + 4
        for answer in answers:
            reply_out = answer.json()["message"]
            saved = by_id[reply_out["id"]]
            assert saved["content"] == reply_out["content"] and saved["status"] == "complete"
            assert by_id[saved["parent_id"]]["role"] == "user"
        users = [m for m in tree["messages"] if m["role"] == "user"]
        for user in users:  # every user message is answered by exactly its own replies
            children = [m for m in tree["messages"] if m["parent_id"] == user["id"]]
            assert children and all(m["role"] == "assistant" for m in children)
        assert sum(1 for m in tree["messages"] if m["parent_id"] == reply["parent_id"]) == 3
    finally:
        for running in (first, second):
            running.process.kill()
            running.process.wait()


def test_events_of_the_stream_parse(service: Service, upstream: FakeUpstream) -> None:
    """`parse_events` (the suite's other reader) still reads streams that carry `id:` lines."""
    upstream.script(Reply(text="a b c"))
    with httpx2.stream(
        "POST", f"{service.url}/api/chat", json={"message": "x", "stream": True}, timeout=30
    ) as response:
        events = parse_events(response.read().decode())
    names = [name for name, _ in events]
    # the first delta goes out on its own, the rest in as few events as they arrived in
    assert names[0] == "start" and names[-1] == "done" and set(names[1:-1]) == {"delta"}
    assert "".join(data["text"] for name, data in events if name == "delta") == "a b c"
