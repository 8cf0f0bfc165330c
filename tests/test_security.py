"""Nobody else on the network reads the chats: token, Host and Origin checks, limits, secrets."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import main
from tests.conftest import ANTHROPIC_KEY, OPENAI_KEY, SERVER_KEY, TOKEN, settings_for, stream_chat
from tests.fake_upstream import FakeUpstream, Reply

ROOT = Path(__file__).resolve().parent.parent
SECRETS = (OPENAI_KEY, ANTHROPIC_KEY, SERVER_KEY, TOKEN)


# --- bearer token -------------------------------------------------------------------------------


def test_with_a_token_every_route_but_health_and_docs_needs_it(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(CHAT_API_TOKEN=TOKEN)
    for method, path in [
        ("GET", "/api/conversations"),
        ("POST", "/api/chat"),
        ("POST", "/api/conversations"),
        ("GET", "/api/models"),
        ("GET", "/api/conversations/" + "0" * 32),
        ("DELETE", "/api/conversations/" + "0" * 32),
        ("GET", "/api/unknown"),
    ]:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": TOKEN},
            {"Authorization": "Basic x"},
        ):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["type"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/api/health", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200
    authorized = client.get("/api/conversations", headers={"Authorization": f"Bearer {TOKEN}"})
    assert authorized.status_code == 200


def test_a_short_token_is_refused_at_start_up(upstream: FakeUpstream, data_dir: Path) -> None:
    with pytest.raises(ValueError, match="CHAT_API_TOKEN"):
        settings_for(upstream, data_dir, CHAT_API_TOKEN="short")


# --- DNS rebinding and cross-site requests ------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["localhost:8000", "127.0.0.1", "127.0.0.1:9", "[::1]:8000", "app.localhost"]
)
def test_loopback_host_names_are_served(client: TestClient, host: str) -> None:
    assert client.get("/api/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8000", "192.168.1.5:8000", "localhost.evil.example"]
)
def test_other_host_names_are_refused_on_loopback(client: TestClient, host: str) -> None:
    response = client.get("/api/conversations", headers={"Host": host})
    assert response.status_code == 403
    assert response.json()["type"] == "forbidden_host"


def test_other_machines_are_refused_when_configured_for_loopback(
    make_client: Callable[..., TestClient],
) -> None:
    local = make_client()
    app = local.app
    with TestClient(app, base_url="http://127.0.0.1", client=("192.168.1.20", 40000)) as remote:
        response = remote.get("/api/health")  # what `uvicorn main:app --host 0.0.0.0` would let in
        assert response.status_code == 403
        assert response.json()["type"] == "forbidden_client"
        assert "CHAT_API_TOKEN" in response.json()["detail"]
    with TestClient(app, base_url="http://127.0.0.1", client=("::1", 40000)) as ipv6:
        assert ipv6.get("/api/health").status_code == 200


def test_allowed_hosts_extend_the_list(make_client: Callable[..., TestClient]) -> None:
    client = make_client(CHAT_ALLOWED_HOSTS="chat.home.arpa, other.home.arpa")
    assert client.get("/api/health", headers={"Host": "chat.home.arpa:8000"}).status_code == 200
    assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 403


def test_cross_origin_browser_requests_are_refused(client: TestClient, upstream: FakeUpstream) -> None:
    response = client.post(
        "/api/chat",
        content=b'{"message": "steal"}',
        headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
    )
    assert response.status_code == 403
    assert response.json()["type"] == "forbidden_origin"
    assert upstream.requests == []
    same = client.get("/api/health", headers={"Origin": "http://127.0.0.1"})
    assert same.status_code == 200


def test_cors_is_off_unless_origins_are_listed(make_client: Callable[..., TestClient]) -> None:
    plain = make_client()
    assert "access-control-allow-origin" not in plain.get("/api/health").headers
    client = make_client(CHAT_CORS_ORIGINS="http://localhost:5173")
    preflight = client.options(
        "/api/chat",
        headers={"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:5173"
    response = client.get("/api/health", headers={"Origin": "http://localhost:5173"})
    assert response.headers["access-control-allow-origin"] == "http://localhost:5173"


# --- body size ----------------------------------------------------------------------------------


def test_a_body_over_the_limit_gets_413_without_being_read(make_client: Callable[..., TestClient]) -> None:
    client = make_client(CHAT_MAX_BODY_BYTES=2048)
    response = client.post("/api/chat", content=b'{"message": "' + b"x" * 5000 + b'"}')
    assert response.status_code == 413
    assert response.json()["type"] == "body_too_large"
    assert "CHAT_MAX_BODY_BYTES" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b'{"message": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    chunked = client.post("/api/chat", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert chunked.json()["type"] == "body_too_large"


def test_deeply_nested_json_is_a_4xx(client: TestClient) -> None:
    body = b'{"message": "hi", "model": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response = client.post("/api/chat", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500


# --- secrets ------------------------------------------------------------------------------------


def test_secrets_appear_in_no_log_body_or_repr(
    make_client: Callable[..., TestClient], upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client(CHAT_API_TOKEN=TOKEN, CHAT_LOG_LEVEL="debug")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bodies: list[str] = []
    upstream.script(
        Reply(status=401, error_message=f"Incorrect API key provided: {OPENAI_KEY}"),
        Reply(status=400, error_message=f"bad key {ANTHROPIC_KEY}"),
    )
    for body in (
        {"message": "one"},
        {"message": "two", "model": "anthropic/claude-fake-1"},
        {"message": "three", "model": "lmstudio/m"},
    ):
        bodies.append(client.post("/api/chat", json=body, headers=auth).text)
    upstream.script(Reply(mode="midstream_error", error_message=f"oops {OPENAI_KEY}"))
    with client.stream(
        "POST", "/api/chat", json={"message": "four", "stream": True}, headers=auth
    ) as response:
        bodies.append(response.read().decode())
    for path in ("/api/models", "/api/health", "/api/conversations", "/openapi.json"):
        bodies.append(client.get(path, headers=auth).text)
    bodies.append(client.get("/api/conversations", headers={"Authorization": "Bearer nope"}).text)
    state = client.app.state  # type: ignore[attr-defined]
    reprs = [repr(state.settings), str(state.settings), *(repr(p) for p in state.providers.values())]
    logs = [record.getMessage() for record in caplog.records] + [caplog.text]
    for secret in SECRETS:
        for text in [*bodies, *reprs, *logs]:
            assert secret not in text


def test_message_contents_are_not_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    stream_chat(client, message="my very private words")
    assert "my very private words" not in caplog.text
    assert "private" not in caplog.text


# --- start-up refusals --------------------------------------------------------------------------


def run_main(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "CHAT_"))}
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py")],
        env={**clean, "CHAT_DATA_DIR": str(tmp_path / "data"), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_refuses_a_network_address_without_a_token(tmp_path: Path) -> None:
    result = run_main({"CHAT_HOST": "0.0.0.0", "CHAT_PORT": "1"}, tmp_path)
    assert result.returncode != 0
    assert "Refusing to listen on 0.0.0.0 without a token" in result.stderr
    assert "CHAT_API_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_uvicorn_main_app_also_refuses_to_start_exposed_without_a_token(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "CHAT_"))}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "main:app", "--port", "1", "--app-dir", str(ROOT)],
        env={**clean, "CHAT_HOST": "0.0.0.0", "CHAT_DATA_DIR": str(tmp_path / "data")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Refusing to listen on 0.0.0.0 without a token" in result.stderr


def test_bad_settings_stop_start_up_with_a_clear_message(tmp_path: Path) -> None:
    result = run_main({"CHAT_PORT": "eighty", "CHAT_STREAM_IDLE_TIMEOUT": "-1"}, tmp_path)
    assert result.returncode != 0
    assert result.returncode == 2
    assert "Invalid setting CHAT_PORT: 'eighty' must be a whole number" in result.stderr
    assert "CHAT_PORT" in result.stderr
    assert "CHAT_STREAM_IDLE_TIMEOUT" in result.stderr
    assert "Traceback" not in result.stderr


def test_settings_come_from_a_dot_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(
        f'OPENAI_API_KEY={OPENAI_KEY}\nCHAT_PORT=8123\nCHAT_SERVERS={{"lm": "http://127.0.0.1:1234/v1"}}\n'
    )
    settings = main.Settings(_env_file=tmp_path / ".env")  # main.ENV_FILE: tests/test_edge.py
    assert settings.port == 8123
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == OPENAI_KEY
    assert settings.servers["lm"].base_url == "http://127.0.0.1:1234/v1"
