"""Nothing acknowledged is ever lost: kill -9 under load, and two server processes on one data dir.

`pytest --soak` runs the long variants (more kills, more appends).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.fake_upstream import FakeUpstream
from tests.test_e2e import Service, start_service


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak"))


def load_files(data_dir: Path) -> dict[str, Any]:
    """Every conversation file, parsed: a file that does not parse fails the test here."""
    return {
        path.stem: json.loads(path.read_bytes())
        for path in (data_dir / "conversations").iterdir()
        if path.suffix == ".json" and not path.name.startswith(".")
    }


class Load:
    """Client threads chatting until stopped; records every acknowledged (200) turn."""

    def __init__(self, urls: list[str], shared_id: str, threads: int, all_shared: bool = False) -> None:
        self.urls = urls
        self.shared_id = shared_id
        self.all_shared = all_shared
        self.acknowledged: list[tuple[str, str, str]] = []  # (conversation id, user text, reply id)
        self.unanswered: list[str] = []  # sent, but the connection failed (server killed, or a time-out)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.chat, args=(i,)) for i in range(threads)]
        self.lock = threading.Lock()

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def chat(self, index: int) -> None:
        own: str | None = None
        url = self.urls[index % len(self.urls)]
        with httpx2.Client(base_url=url, timeout=10) as http:
            for n in range(1_000_000):
                if self.stop.is_set():
                    return
                text = f"t{index}-{n}-{random.random()}"
                body: dict[str, Any] = {"message": text}
                conversation_id = self.shared_id if self.all_shared or index % 2 == 0 else own
                if conversation_id:
                    body["conversation_id"] = conversation_id
                try:
                    response = http.post("/api/chat", json=body)
                except httpx2.TransportError:
                    with self.lock:  # the server was killed, or too busy to answer in time: it may
                        self.unanswered.append(text)  # still have saved the turn
                    return
                if response.status_code == 200:
                    reply = response.json()
                    own = own if index % 2 == 0 else reply["conversation_id"]
                    with self.lock:
                        self.acknowledged.append((reply["conversation_id"], text, reply["message"]["id"]))


def check_acknowledged(files: dict[str, Any], acknowledged: list[tuple[str, str, str]]) -> None:
    for conversation_id, text, reply_id in acknowledged:
        messages = files[conversation_id]["messages"]
        assert [m["content"] for m in messages].count(text) == 1, text
        reply = next(m for m in messages if m["id"] == reply_id)
        assert reply["status"] == "complete"
        assert reply["content"] == f"You said: {text}"


def test_kill_9_under_load_loses_no_acknowledged_message(
    upstream: FakeUpstream, tmp_path: Path, soak: bool
) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "service.log"
    rounds = 25 if soak else 4
    rng = random.Random(20261124)
    acknowledged: list[tuple[str, str, str]] = []
    shared_id = ""
    for _ in range(rounds):
        service = start_service(upstream, data_dir, log)
        if not shared_id:
            shared_id = httpx2.post(f"{service.url}/api/conversations", json={}).json()["id"]
        with Load([service.url], shared_id, threads=6) as load:
            deadline = time.monotonic() + 20
            while not load.acknowledged and time.monotonic() < deadline:  # past the SDK's first import
                time.sleep(0.01)
            time.sleep(rng.uniform(0.2, 1.0))
            service.process.kill()  # SIGKILL: no shutdown, no flush
            service.process.wait()
        acknowledged += load.acknowledged
        check_acknowledged(load_files(data_dir), acknowledged)

    assert len(acknowledged) > 10 * rounds, "the load should have made real progress"
    final = start_service(upstream, data_dir, log)
    try:
        files = load_files(data_dir)
        listed = list_all(final)
        assert {item["id"]: item["message_count"] for item in listed} == {
            cid: len(doc["messages"]) for cid, doc in files.items()
        }
        assert httpx2.get(f"{final.url}/api/health").json()["unreadable_conversations"] == []
    finally:
        final.stop()
    print(f"\nkill -9: {rounds} kills survived, {len(acknowledged)} acknowledged turns verified")


def list_all(service: Service) -> list[Any]:
    items: list[Any] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        page = httpx2.get(f"{service.url}/api/conversations", params=params).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


@pytest.mark.timeout(1800)  # a bound for a hang, not for speed: CI is a busy 2-core box
def test_two_server_processes_on_one_data_dir_lose_no_update(
    upstream: FakeUpstream, tmp_path: Path, soak: bool
) -> None:
    data_dir = tmp_path / "data"
    target = 5_000 if soak else int(os.environ.get("CHAT_TEST_APPENDS", "1000"))
    first = start_service(upstream, data_dir, tmp_path / "first.log")
    second = start_service(upstream, data_dir, tmp_path / "second.log")
    try:
        shared_id = httpx2.post(f"{first.url}/api/conversations", json={}).json()["id"]
        started = time.monotonic()
        with Load([first.url, second.url], shared_id, threads=6, all_shared=True) as load:
            while len([a for a in load.acknowledged if a[0] == shared_id]) < target:
                time.sleep(0.05)
        files = load_files(data_dir)
        check_acknowledged(files, load.acknowledged)
        shared = [a for a in load.acknowledged if a[0] == shared_id]
        user_messages = [m for m in files[shared_id]["messages"] if m["role"] == "user"]
        saved = Counter(m["content"] for m in user_messages)
        assert all(count == 1 for count in saved.values())  # nothing written twice
        # every acknowledged turn is there, and nothing else but turns whose answer never arrived
        assert Counter(text for _, text, _ in shared) - saved == Counter()
        assert set(saved) - {text for _, text, _ in shared} <= set(load.unanswered)
        # each process's listing sees the other's writes
        for service in (first, second):
            counts = {item["id"]: item["message_count"] for item in list_all(service)}
            assert counts == {cid: len(doc["messages"]) for cid, doc in files.items()}
    finally:
        first.stop()
        second.stop()
    took = time.monotonic() - started
    print(f"\ntwo processes: {len(shared)} turns appended to one conversation in {took:.1f} s, verified")
