"""Shared fixtures: a clean environment, a data dir on tmp_path, the fake upstream, the app."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import main
from tests.fake_upstream import FakeUpstream

# Recognisable fake secrets: test_security checks that they never leak.
OPENAI_KEY = "sk-test-OPENAI-SECRET-0123456789"
ANTHROPIC_KEY = "sk-ant-test-ANTHROPIC-SECRET-0123456789"
SERVER_KEY = "lmstudio-test-SERVER-SECRET-0123456789"
TOKEN = "a-long-enough-test-TOKEN-0123456789"

# Variables the SDKs or our settings read from the environment: none may come from the machine.
ENV_PREFIXES = ("OPENAI_", "ANTHROPIC_", "CHAT_", "OLLAMA_")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env is read


@pytest.fixture(autouse=True)
def no_secret_is_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test runs with DEBUG logging captured; no fake key or token may appear in it."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="filelock")  # a line per lock: noise in failure reports
    yield
    for secret in (OPENAI_KEY, ANTHROPIC_KEY, SERVER_KEY, TOKEN):
        assert secret not in caplog.text, f"a secret was logged: {secret[:12]}..."


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def upstream(upstream_server: FakeUpstream) -> Iterator[FakeUpstream]:
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def settings_for(upstream: FakeUpstream, data_dir: Path, **overrides: Any) -> main.Settings:
    values: dict[str, Any] = {
        "CHAT_DATA_DIR": data_dir,
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": upstream.openai_base_url,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": upstream.anthropic_base_url,
        "OLLAMA_BASE_URL": upstream.openai_base_url,
        "CHAT_SERVERS": {"lmstudio": {"base_url": upstream.openai_base_url, "api_key": SERVER_KEY}},
        "CHAT_DEFAULT_MODEL": "openai/fake-gpt-1",
        "CHAT_STREAM_IDLE_TIMEOUT": 2.0,
    }
    values.update(overrides)
    return main.Settings(_env_file=None, **values)


@pytest.fixture
def make_client(upstream: FakeUpstream, data_dir: Path) -> Iterator[Callable[..., TestClient]]:
    """make_client(**settings) -> an entered TestClient on http://127.0.0.1."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        app: FastAPI = main.create_app(settings_for(upstream, data_dir, **overrides))
        client = TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def fail_writes_containing(monkeypatch: pytest.MonkeyPatch, needle: bytes, code: int) -> None:
    """Make os.write raise OSError(code) for data containing `needle`: a disk fault at the os boundary
    (everything runs as root here, so permissions and full disks cannot be staged)."""
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if needle in bytes(data):
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def parse_events(body: str) -> list[tuple[str, Any]]:
    """The (event, data) pairs of a text/event-stream body; comments (keep-alives) are skipped."""
    import json

    events = []
    for block in body.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def ledger_lines(data_dir: Path, lines: int) -> list[dict[str, Any]]:
    """The usage ledger once it holds `lines` lines: a reply counts at once, its line follows moments
    later (written in the background)."""
    path = data_dir / "usage.jsonl"
    deadline = time.monotonic() + 30
    while True:
        found = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(found) >= lines or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def stream_chat(client: TestClient, **body: Any) -> list[tuple[str, Any]]:
    with client.stream("POST", "/api/chat", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return parse_events(response.read().decode())


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long reliability variants")
    parser.addoption(
        "--screenshots", action="store_true", help="write the page's screenshots to docs/screenshots/"
    )
