"""End to end: `python main.py` as a real process, real HTTP, the fake upstream standing in."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import ANTHROPIC_KEY, OPENAI_KEY, parse_events
from tests.fake_upstream import FakeUpstream, Reply

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    process: subprocess.Popen[str]
    url: str
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> float:
        """Send `sig` and return how long the process took to exit."""
        started = time.monotonic()
        self.process.send_signal(sig)
        self.process.wait(timeout=timeout)
        return time.monotonic() - started


def start_service(upstream: FakeUpstream, data_dir: Path, log: Path, **env: str) -> Service:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "CHAT_"))}
    settings = {
        "CHAT_PORT": str(port),
        "CHAT_DATA_DIR": str(data_dir),
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": upstream.openai_base_url,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": upstream.anthropic_base_url,
        "CHAT_DEFAULT_MODEL": "openai/fake-gpt-1",
        "CHAT_SHUTDOWN_TIMEOUT": "2",
        **env,
    }
    with log.open("a") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py")],
            env={**clean, **settings},
            cwd=data_dir.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx2.get(f"{url}/api/health", timeout=1).status_code == 200:
                return Service(process, url, log)
        except httpx2.TransportError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"service did not start:\n{log.read_text()}")


@pytest.fixture
def service(upstream: FakeUpstream, tmp_path: Path) -> Iterator[Service]:
    running = start_service(upstream, tmp_path / "data", tmp_path / "service.log")
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()
    assert_no_secret_in(running.log)


def assert_no_secret_in(log: Path) -> None:
    text = log.read_text()
    for secret in (OPENAI_KEY, ANTHROPIC_KEY):
        assert secret not in text, "a key reached the service's log"


def stream_events(url: str, body: dict[str, Any]) -> list[tuple[str, Any]]:
    with httpx2.stream("POST", f"{url}/api/chat", json={**body, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        return parse_events(response.read().decode())


def read_conversation(data_dir: Path, conversation_id: str) -> Any:
    return json.loads((data_dir / "conversations" / f"{conversation_id}.json").read_text())


def test_chat_stream_restart_and_find_it_intact(upstream: FakeUpstream, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "service.log"
    first = start_service(upstream, data_dir, log)
    try:
        reply = httpx2.post(f"{first.url}/api/chat", json={"message": "Hello"}, timeout=30)
        assert reply.status_code == 200
        conversation_id = reply.json()["conversation_id"]
        assert reply.json()["message"]["content"] == "You said: Hello"

        events = stream_events(
            first.url,
            {
                "message": "And Anthropic?",
                "conversation_id": conversation_id,
                "model": "anthropic/claude-fake-1",
            },
        )
        assert events[-1][0] == "done"
        assert events[-1][1]["message"]["content"] == "You said: And Anthropic?"
        before = httpx2.get(f"{first.url}/api/conversations/{conversation_id}").json()
        assert first.stop(timeout=60) < 60  # it stops by itself, not killed
        assert first.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    finally:
        if first.process.poll() is None:
            first.process.kill()

    second = start_service(upstream, data_dir, log, CHAT_LOG_LEVEL="debug")
    try:
        after = httpx2.get(f"{second.url}/api/conversations/{conversation_id}").json()
        assert after == before
        assert [m["role"] for m in after["messages"]] == ["user", "assistant", "user", "assistant"]
        listed = httpx2.get(f"{second.url}/api/conversations").json()["items"]
        assert [item["id"] for item in listed] == [conversation_id]
        more = httpx2.post(
            f"{second.url}/api/chat",
            json={"message": "Still there?", "conversation_id": conversation_id},
            timeout=30,
        )
        assert more.status_code == 200
        assert len(more.json()["message"]["content"]) > 0
    finally:
        second.stop()
    assert_no_secret_in(log)


def test_client_disconnect_mid_stream_closes_upstream_and_keeps_the_partial_reply(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.script(Reply(text="word " * 400, chunk_delay=0.01))
    with httpx2.stream(
        "POST", f"{service.url}/api/chat", json={"message": "go", "stream": True}, timeout=30
    ) as response:
        lines = response.iter_lines()
        start = None
        deltas = 0
        for line in lines:
            if line.startswith("data: ") and start is None:
                start = json.loads(line[6:])
            elif line == "event: delta":
                deltas += 1
                if deltas == 5:
                    break
    gone_at = time.monotonic()
    assert start is not None
    closed_at = upstream.wait_closed(0, timeout=60)
    assert closed_at is not None
    # generous, yet far below what a missed disconnect costs (the 120 s idle timeout)
    assert closed_at - gone_at < 30, "the upstream stream should be closed promptly"
    reply = wait_for_reply(tmp_path / "data", start["conversation_id"], start["message_id"], "disconnected")
    assert reply["status"] == "incomplete"
    assert reply["content"].startswith("word word word")
    assert len(reply["content"]) < len("word " * 400)


def test_client_disconnect_before_the_first_token_closes_upstream(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.script(Reply(mode="stall_headers"))
    with httpx2.stream(
        "POST", f"{service.url}/api/chat", json={"message": "go", "stream": True}, timeout=30
    ) as response:
        lines = response.iter_lines()  # kept: a collected line iterator would close the connection
        start = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert upstream.wait_requests(1, timeout=20)  # the provider has been called
    assert upstream.wait_closed(0, timeout=30) is not None
    # only the save after the disconnect says why the reply ended (the placeholder says null)
    reply = wait_for_reply(tmp_path / "data", start["conversation_id"], start["message_id"], "disconnected")
    assert (reply["status"], reply["content"]) == ("incomplete", "")


def test_client_disconnect_during_a_non_streaming_turn_closes_upstream(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.script(Reply(mode="stall_headers"))
    body = json.dumps({"message": "wait"}).encode()
    port = int(service.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = "POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert upstream.wait_requests(1, timeout=20)  # the provider has been called
    assert upstream.wait_closed(0, timeout=30) is not None
    conversation_id = httpx2.get(f"{service.url}/api/conversations").json()["items"][0]["id"]
    reply_id = read_conversation(tmp_path / "data", conversation_id)["current_id"]
    reply = wait_for_reply(tmp_path / "data", conversation_id, reply_id, "disconnected")
    assert (reply["status"], reply["content"]) == ("incomplete", "")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_during_live_streams_ends_them_at_once_saved_as_incomplete(
    upstream: FakeUpstream, tmp_path: Path, sig: int
) -> None:
    # a graceful-shutdown timeout and streams far longer than the bound below: only ending the
    # streams at once passes, however busy the machine
    service = start_service(upstream, tmp_path / "data", tmp_path / "service.log", CHAT_SHUTDOWN_TIMEOUT="60")
    upstream.script(*(Reply(text="tick " * 1000, chunk_delay=0.06) for _ in range(3)))
    responses = []
    readers = []  # kept alive: a collected line iterator would close its connection
    starts = []
    for _ in range(3):
        response = httpx2.stream(
            "POST", f"{service.url}/api/chat", json={"message": "long", "stream": True}, timeout=30
        )
        lines = response.__enter__().iter_lines()
        responses.append(response)
        readers.append(lines)
        starts.append(json.loads(next(line for line in lines if line.startswith("data: "))[6:]))
        next(line for line in lines if line == "event: delta")
    try:
        took = service.stop(sig, timeout=60)
        endings = [parse_events("\n".join(lines) + "\n\n")[-1] for lines in readers]
    finally:
        for response in responses:
            with contextlib.suppress(httpx2.HTTPError):
                response.__exit__(None, None, None)
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()
    assert took < 30, "streams should end at once, not wait for the graceful-shutdown timeout"
    for (name, data), start in zip(endings, starts, strict=True):
        assert name == "error"
        assert data["error"]["type"] == "server_shutdown"
        assert data["message"]["status"] == "incomplete"
        reply = wait_for_reply(tmp_path / "data", start["conversation_id"], start["message_id"], "shutdown")
        assert reply["content"] == data["message"]["content"]
        assert reply["content"].startswith("tick")
    assert "Traceback" not in service.log.read_text()


def test_shutdown_answers_a_waiting_non_streaming_turn_with_503(
    service: Service, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.script(Reply(mode="stall_headers"))
    answers: list[httpx2.Response] = []
    waiting = threading.Thread(
        target=lambda: answers.append(
            httpx2.post(f"{service.url}/api/chat", json={"message": "wait"}, timeout=30)
        )
    )
    waiting.start()
    assert upstream.wait_requests(1, timeout=20)
    service.stop(signal.SIGTERM)
    waiting.join(timeout=30)
    assert answers[0].status_code == 503
    body = answers[0].json()
    assert body["type"] == "server_shutdown"
    saved = read_conversation(tmp_path / "data", body["conversation_id"])["messages"][-1]
    # the placeholder written before the provider call has finish_reason null: this is the real save
    assert (saved["status"], saved["finish_reason"]) == ("incomplete", "shutdown")
    assert {**saved, "sibling_ids": [saved["id"]]} == body["message"]


def wait_for_reply(data_dir: Path, conversation_id: str, message_id: str, finish_reason: str) -> Any:
    """The reply once its final save (with this finish_reason) is on disk; generous on a busy machine."""
    deadline = time.monotonic() + 30
    while True:
        messages = read_conversation(data_dir, conversation_id)["messages"]
        reply = next(m for m in messages if m["id"] == message_id)
        if reply["finish_reason"] == finish_reason or time.monotonic() > deadline:
            assert reply["finish_reason"] == finish_reason
            return reply
        time.sleep(0.05)
