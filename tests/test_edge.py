"""The edges of the service (issue 7): Guard on every scope, strict headers, CORS on refusals, clear
body errors, the error table; settings, logs, header size and docs through a real `python main.py`."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

import guard
import main
import providers
import storage
from tests.conftest import OPENAI_KEY, TOKEN
from tests.fake_upstream import FakeUpstream
from tests.test_e2e import Service, free_port, start_service

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# --- Guard judges every scope type ----------------------------------------------------------------


def test_a_websocket_scope_passes_the_same_checks(make_client: Callable[..., TestClient]) -> None:
    client = make_client(CHAT_API_TOKEN=TOKEN)
    local = {"Host": "127.0.0.1"}  # TestClient's websockets otherwise say `testserver`

    def denied(headers: dict[str, str]) -> WebSocketDenialResponse:
        with (
            pytest.raises(WebSocketDenialResponse) as refusal,
            client.websocket_connect("/ws", headers=headers),
        ):
            pass
        return refusal.value

    no_token = denied(local)
    assert (no_token.status_code, no_token.json()["type"]) == (401, "unauthorized")
    foreign = denied({**local, **AUTH, "Origin": "https://evil.example"})
    assert (foreign.status_code, foreign.json()["type"]) == (403, "forbidden_origin")
    rebound = denied({**AUTH, "Host": "evil.example"})
    assert (rebound.status_code, rebound.json()["type"]) == (403, "forbidden_host")
    # with every check passed the app answers as for any path without a websocket route: it closes
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws", headers={**local, **AUTH}):
        pass


def test_an_unknown_scope_type_is_refused() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app was reached")

    checked = guard.Guard(
        app,
        host="127.0.0.1",
        allow_remote=False,
        allowed_hosts=[],
        cors_origins=[],
        max_body_bytes=1024,
        max_header_bytes=1024,
        token=None,
        open_paths=[],
    )

    async def nothing() -> Any:
        return {}

    async def ignore(message: Any) -> None:
        return None

    with pytest.raises(RuntimeError, match="webtransport"):
        asyncio.run(checked({"type": "webtransport", "headers": []}, nothing, ignore))


# --- strict headers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "[::1]evil.com",
        "[::1]@evil.com",
        "localhost:x@evil.com",
        "localhost:8000@evil.com",
        "localhost:99999",
        "localhost:",
        "local host",
        "[::1",
        "[evil.com]",
        "127.0.0.1:80:80",
        "",
    ],
)
def test_a_malformed_host_is_refused(client: TestClient, host: str) -> None:
    response = client.get("/api/conversations", headers={"Host": host})
    assert response.status_code == 400
    assert response.json()["type"] == "invalid_header"
    assert "e.g. 'localhost:8000'" in response.json()["detail"]


@pytest.mark.parametrize(
    "host", ["[::1]", "[0:0:0:0:0:0:0:1]:8000", "LocalHost:8000", "localhost.", "127.0.0.1:1"]
)
def test_well_formed_loopback_hosts_are_served(client: TestClient, host: str) -> None:
    assert client.get("/api/conversations", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("name", ["Host", "Origin", "Authorization", "Content-Type", "Sec-Fetch-Site"])
def test_a_judged_header_sent_twice_is_refused(client: TestClient, name: str) -> None:
    first = {"Host": "127.0.0.1", "Origin": "http://127.0.0.1"}.get(name, "x")
    response = client.get("/api/conversations", headers=[(name, first), (name, "evil.example")])
    assert response.status_code == 400
    assert response.json() == {
        "detail": f"the request has more than one {name.lower()} header; send it once",
        "type": "invalid_header",
    }


def test_headers_over_the_limit_get_431(client: TestClient) -> None:
    response = client.get("/api/conversations", headers={"X-Big": "a" * main.MAX_HEADER_BYTES})
    assert response.status_code == 431
    assert response.json()["type"] == "headers_too_large"
    assert client.get("/api/conversations", headers={"X-Big": "a" * 32_000}).status_code == 200


# --- cross-site requests ---------------------------------------------------------------------------


def test_a_cross_site_post_without_origin_is_refused(client: TestClient, upstream: FakeUpstream) -> None:
    response = client.post(
        "/api/chat",
        content=b'{"message": "steal"}',
        headers={"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"},
    )
    assert response.status_code == 403
    assert response.json()["type"] == "forbidden_origin"
    assert upstream.requests == []
    for site in ("same-origin", "none"):
        assert client.get("/api/conversations", headers={"Sec-Fetch-Site": site}).status_code == 200
    followed = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert client.get("/docs", headers=followed).status_code == 200  # a link to the docs still works
    framed = {**followed, "Sec-Fetch-Dest": "iframe"}
    assert client.get("/docs", headers=framed).status_code == 403


def test_a_listed_origin_may_call_cross_site(make_client: Callable[..., TestClient]) -> None:
    client = make_client(CHAT_CORS_ORIGINS="http://localhost:5173")
    headers = {"Origin": "http://localhost:5173", "Sec-Fetch-Site": "same-site"}
    assert client.get("/api/conversations", headers=headers).status_code == 200
    headers["Sec-Fetch-Site"] = "cross-site"
    assert client.get("/api/conversations", headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("http://127.0.0.1", 200),
        ("http://127.0.0.1:80", 200),
        ("https://127.0.0.1", 403),
        ("https://127.0.0.1:80", 403),
        ("http://127.0.0.1:8000", 403),
        ("http://127.0.0.1/path", 403),
        ("null", 403),
    ],
)
def test_same_origin_compares_scheme_and_port(client: TestClient, origin: str, status: int) -> None:
    response = client.get("/api/conversations", headers={"Origin": origin})
    assert response.status_code == status, response.text


def test_cors_headers_reach_guards_refusals(make_client: Callable[..., TestClient]) -> None:
    client = make_client(CHAT_CORS_ORIGINS="http://localhost:5173", CHAT_API_TOKEN=TOKEN)
    response = client.get("/api/conversations", headers={"Origin": "http://localhost:5173"})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert response.json()["type"] == "unauthorized"  # what a page on that origin can now read
    foreign = client.get("/api/conversations", headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert "access-control-allow-origin" not in foreign.headers


# --- bodies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"],
)
def test_a_body_that_is_not_declared_json_gets_415(
    client: TestClient, upstream: FakeUpstream, data_dir: Path, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for method, path in (("POST", "/api/chat"), ("POST", "/api/conversations")):
        response = client.request(method, path, content=b'{"message": "Hi"}', headers=headers)
        assert response.status_code == 415, response.text
        body = response.json()
        assert body["type"] == "unsupported_media_type"
        assert "'Content-Type: application/json'" in body["detail"]
        assert "curl --json" in body["detail"]
    assert upstream.requests == []
    assert list((data_dir / "conversations").glob("*.json")) == []


def test_json_with_a_json_media_type_is_accepted(client: TestClient) -> None:
    for media in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = client.post(
            "/api/conversations", content=b'{"title": "t"}', headers={"Content-Type": media}
        )
        assert response.status_code == 201, response.text


def test_ten_thousand_deep_json_gets_a_documented_error(client: TestClient) -> None:
    body = b'{"message": "hi", "model": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    response = client.post("/api/chat", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["type"] == "invalid_json"
    assert "nested too deeply" in response.json()["detail"]


def test_validation_messages_say_what_to_send(client: TestClient) -> None:
    response = client.post("/api/chat", json={"message": "Hi", "model": "llama3.2"})
    assert response.status_code == 422
    (problem,) = response.json()["detail"]
    assert problem["loc"] == ["body", "model"]
    assert problem["msg"] == (
        'model must be "provider/model", e.g. "ollama/llama3.2"; '
        "providers: anthropic, lmstudio, ollama, openai"
    )
    missing = client.post("/api/chat", json={"mesage": "Hi"}).json()["detail"]
    assert {p["msg"] for p in missing} == {
        "message is required",
        "unknown field 'mesage'; /docs lists the fields this request takes",
    }
    empty = client.post("/api/chat", headers={"Content-Type": "application/json"}).json()
    assert "curl --json" in empty["detail"][0]["msg"]
    listed = client.post("/api/chat", json=["Hi"]).json()["detail"][0]["msg"]
    assert listed.startswith("the body must be a JSON object")


def error_types_in_code() -> set[str]:
    """Every `type` the code can answer with: error classes, and literals passed to `error()`,
    `Refusal()`, a `{"type": ...}` body or an HTTP status map."""
    kinds: set[str] = set()
    # ProviderError itself is never raised (providers raise its subclasses); StorageError is
    stack: list[type] = [*providers.ProviderError.__subclasses__(), storage.StorageError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        kinds.add(cls.type)  # type: ignore[attr-defined]
    for path in ROOT.glob("*.py"):
        if path.name.startswith("wire"):  # the /v1 modules speak OpenAI's and Anthropic's error vocabularies
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            kinds.update(literal_kinds(node))
    return {k for k in kinds if re.fullmatch(r"[a-z]+(_[a-z]+)+|[a-z]+", k)}


def literal_kinds(node: ast.AST) -> list[str]:
    def text(value: ast.expr) -> list[str]:
        return [value.value] if isinstance(value, ast.Constant) and isinstance(value.value, str) else []

    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("error", "Refusal"):
        return text(node.args[2]) if len(node.args) > 2 else []
    if isinstance(node, ast.Dict):  # {"type": "x", "detail"/"message": ...} and {404: "not_found"}
        keys = {key.value for key in node.keys if isinstance(key, ast.Constant)}
        body = "type" in keys and bool(keys & {"detail", "message"})
        return [
            kind
            for key, value in zip(node.keys, node.values, strict=True)
            if isinstance(key, ast.Constant)
            and ((body and key.value == "type") or isinstance(key.value, int))
            for kind in text(value)
        ]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return text(node.args[-1]) if getattr(node.func.value, "id", None) == "kinds" else []
    return []


def test_every_error_type_is_in_the_readme_table() -> None:
    table = (ROOT / "README.md").read_text().split("| status | `type` | when |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"`([a-z_]+)`", table))
    found = error_types_in_code()
    assert {"unauthorized", "invalid_header", "unsupported_media_type", "invalid_json"} <= found
    assert found - documented == set()


# --- through a real `python main.py` -------------------------------------------------------------

COOKIE = "session=COOKIE-SECRET-0123456789"
X_API_KEY = "XKEY-SECRET-0123456789"
QUERY = "QUERY-SECRET-0123456789"
HEADER_SECRETS = (TOKEN, "COOKIE-SECRET", X_API_KEY, QUERY)


def raw_request(port: int, request: bytes) -> bytes:
    """Send bytes as they are (no client library fixes them up); the server's answer, or b''."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        # the server may refuse before reading it all; and no half-close after it: uvicorn takes an
        # EOF for a client that is gone and drops the answer
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def upgrade_request(port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {TOKEN}\r\nCookie: {COOKIE}\r\nx-api-key: {X_API_KEY}\r\n\r\n"
    ).encode()


def drive_traffic(url: str, port: int) -> None:
    secret_headers = {**AUTH, "Cookie": COOKIE, "x-api-key": X_API_KEY}
    assert httpx2.get(f"{url}/api/conversations", headers=secret_headers).status_code == 200
    assert httpx2.get(f"{url}/api/conversations?token={QUERY}").status_code == 401
    chat = httpx2.post(f"{url}/api/chat", json={"message": "Hi"}, headers=secret_headers, timeout=30)
    assert chat.status_code == 200
    answer = raw_request(port, upgrade_request(port, f"/api/conversations?token={QUERY}"))
    # `python main.py` has no websocket protocol (the upgrade is a plain, authorized GET); uvicorn's
    # own websockets close it, as the app has no websocket route
    assert answer.split(b" ", 2)[1] in (b"200", b"403"), answer[:200]


def test_debug_logs_of_a_real_server_hold_no_header_secret(upstream: FakeUpstream, tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    service = start_service(upstream, tmp_path / "data", log, CHAT_LOG_LEVEL="debug", CHAT_API_TOKEN=TOKEN)
    try:
        drive_traffic(service.url, int(service.url.rsplit(":", 1)[1]))
    finally:
        service.stop()
    text = log.read_text()
    assert "DEBUG" in text  # the log really ran at DEBUG
    assert '"GET /api/conversations HTTP/1.1" 401' in text  # the access log keeps the path, not the query
    for secret in (*HEADER_SECRETS, OPENAI_KEY):
        assert secret not in text


def test_uvicorn_main_app_at_debug_with_websockets_logs_no_header_secret(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "uvicorn.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "CHAT_"))},
        "CHAT_DATA_DIR": str(tmp_path / "data"),
        "CHAT_API_TOKEN": TOKEN,
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": upstream.openai_base_url,
        "CHAT_DEFAULT_MODEL": "openai/fake-gpt-1",
    }
    command = [sys.executable, "-m", "uvicorn", "main:app", "--app-dir", str(ROOT), "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(
            [*command, "--log-level", "debug", "--ws", "websockets-sansio"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        drive_traffic(url, port)
    finally:
        process.terminate()
        process.wait(timeout=30)
    text = log.read_text()
    assert "Uvicorn running" in text
    for secret in HEADER_SECRETS:
        assert secret not in text


def wait_until_serving(url: str, process: subprocess.Popen[Any], log: Path) -> None:
    while process.poll() is None:
        try:
            if httpx2.get(f"{url}/api/health", timeout=1).status_code == 200:
                return
        except httpx2.TransportError:
            pass
    raise AssertionError(f"the service did not start:\n{log.read_text()}")


@pytest.fixture
def debug_service(upstream: FakeUpstream, tmp_path: Path) -> Iterator[Service]:
    running = start_service(upstream, tmp_path / "data", tmp_path / "service.log", CHAT_API_TOKEN=TOKEN)
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_header_size_is_bounded(debug_service: Service) -> None:
    port = int(debug_service.url.rsplit(":", 1)[1])

    def request(header_bytes: int) -> bytes:
        head = f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n".encode()
        return head + b"X-Big: " + b"a" * header_bytes + b"\r\n\r\n"

    assert raw_request(port, request(32 * 1024)).startswith(b"HTTP/1.1 200")
    refused = raw_request(port, request(100 * 1024))
    # the protocol refuses once the bytes of an incomplete head pass the limit; headers that arrive
    # in one read are refused by Guard: 431 in JSON either way (or a reset, when the server closes
    # while bytes it did not read are still arriving)
    assert refused == b"" or (
        refused.startswith(b"HTTP/1.1 431") and b'"type":"headers_too_large"' in refused
    )
    before = rss_kib(debug_service.process.pid)
    huge = raw_request(port, request(64 * 1024 * 1024))
    assert huge == b"" or huge.startswith(b"HTTP/1.1 431")  # the server may close while we still send
    assert rss_kib(debug_service.process.pid) - before < 32 * 1024  # plain httptools: +120 MB
    assert httpx2.get(f"{debug_service.url}/api/health").status_code == 200


def test_docs_are_served_from_the_project_and_declare_the_bearer_scheme(debug_service: Service) -> None:
    page = httpx2.get(f"{debug_service.url}/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/docs/assets/") for s in sources), sources
    for source in sources:
        asset = httpx2.get(f"{debug_service.url}{source}")  # no token: the page loads before one is typed
        assert asset.status_code == 200, source
        assert len(asset.content) > 500
    assert httpx2.get(f"{debug_service.url}/docs/assets/../main.py").status_code in (401, 404)
    schema = httpx2.get(f"{debug_service.url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "the CHAT_API_TOKEN",
    }
    assert schema["paths"]["/api/chat"]["post"]["security"] == [{"bearer": []}]
    assert schema["paths"]["/api/health"]["get"]["security"] == []
    assert "cdn" not in page.text.lower()


# --- settings and start-up -----------------------------------------------------------------------


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "CHAT_", "OLLAMA_"))
    }
    return subprocess.run(
        command, env={**clean, **env}, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"CHAT_SERVERS": '{"lm": "http://127.0.0.1:1234/v1",}'},
            "Invalid setting CHAT_SERVERS: is not valid JSON (",
        ),
        ({"CHAT_SERVERS": '{"lm": "ftp://x"}'}, "Invalid setting CHAT_SERVERS (lm.base_url): does not have"),
        (
            {"CHAT_API_TOKEN": "short-secret"},
            "Invalid setting CHAT_API_TOKEN: must be at least 16 characters",
        ),
        ({"CHAT_PORT": "0"}, "Invalid setting CHAT_PORT: '0' must be at least 1; e.g. CHAT_PORT=8000"),
        ({"CHAT_LOG_LEVEL": "loud"}, "Invalid setting CHAT_LOG_LEVEL: 'loud' must be one of"),
        ({"CHAT_HOST": "0.0.0.0"}, "Refusing to listen on 0.0.0.0 without a token"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_code_2(tmp_path: Path, env: dict[str, str], line: str) -> None:
    for command in (
        [sys.executable, str(ROOT / "main.py")],
        [sys.executable, "-m", "uvicorn", "main:app", "--app-dir", str(ROOT), "--port", "1"],
    ):
        result = run(command, tmp_path, CHAT_DATA_DIR=str(tmp_path / "data"), **env)
        if env.get("CHAT_HOST") and "uvicorn" in command:
            continue  # judged by the lifespan under uvicorn: SPEC.md §8
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
        assert result.stderr.startswith(line), result.stderr
        assert "e.g. " in result.stderr or "CHAT_API_TOKEN" in result.stderr
        assert "short-secret" not in result.stderr
        assert "items" not in result.stderr


def test_an_unusable_data_dir_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    result = run(
        [sys.executable, str(ROOT / "main.py")], tmp_path, CHAT_DATA_DIR=str(tmp_path / "a-file" / "data")
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"Invalid setting CHAT_DATA_DIR: {tmp_path / 'a-file' / 'data'} cannot be used (Not a directory); "
        "e.g. CHAT_DATA_DIR=/home/you/chat-data"
    ]


def test_data_and_env_are_found_beside_main_py_wherever_it_is_started(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    skip = shutil.ignore_patterns(
        ".git", ".venv", "data", ".env", "tests", "bench", "__pycache__", ".*_cache"
    )
    shutil.copytree(ROOT, project, ignore=skip)
    port = free_port()
    (project / ".env").write_text(
        f"CHAT_PORT={port}\nOPENAI_API_KEY={OPENAI_KEY}\nOPENAI_BASE_URL={upstream.openai_base_url}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = tmp_path / "service.log"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "CHAT_", "OLLAMA_"))
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, str(project / "main.py")],
            env=env,
            cwd=elsewhere,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        reply = httpx2.post(
            f"{url}/api/chat", json={"message": "Hi", "model": "openai/fake-gpt-1"}, timeout=30
        )
        assert reply.status_code == 200, reply.text
    finally:
        process.terminate()
        process.wait(timeout=30)
    conversation = project / "data" / "conversations" / f"{reply.json()['conversation_id']}.json"
    assert json.loads(conversation.read_text())["messages"]
    assert not (elsewhere / "data").exists()
    text = log.read_text()
    assert f"conversations are kept in {project / 'data' / 'conversations'}" in text
    assert f"settings from the environment and {project / '.env'}" in text


def test_a_large_body_and_the_start_of_the_next_request_are_no_oversized_head(debug_service: Service) -> None:
    """The bound counts only reads inside one unfinished head: a read that ends a large body and
    begins the next request's head is not taken for a large head (no 431 written mid-stream)."""
    port = int(debug_service.url.rsplit(":", 1)[1])
    body = b'{"message": 5, "padding": "' + b"a" * (300 * 1024) + b'"}'
    host = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
    first = b"POST /api/chat HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
    first += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(first + b"GET /api/health HTTP/1.1\r\n" + host)  # the next head, unfinished
        answer = b""
        while b"HTTP/1.1 422" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 422") and b"431" not in answer, answer[:300]
