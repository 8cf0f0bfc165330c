"""`Guard`: the checks every request passes before any route sees it, and the one place that turns a
refusal into a response.

It is pure ASGI (so client disconnects still reach the routes) and sits inside CORS, so that a
browser page on an allowed origin can read a refusal. A module that must render refusals in another
error shape (the `/v1` wire formats) replaces `render_refusal`: `create_app` passes it to `Guard`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import orjson
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from web import error

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Headers whose value Guard judges: with two copies Guard and Starlette could read different ones.
SINGLE_HEADERS = ("host", "origin", "authorization", "content-length", "content-type", "sec-fetch-site")
LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
AUTHORITY = re.compile(
    rf"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>{LABEL}(?:\.{LABEL})*\.?))(?::(?P<port>[0-9]{{1,5}}))?"
)
ORIGIN = re.compile(r"(?P<scheme>https?)://(?P<authority>[^/?#@\s]+)")
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Refusal:
    """Why Guard refused a request, in the API's terms; `render_refusal` makes it a response."""

    status: int
    detail: str
    type: str
    headers: Mapping[str, str] | None = None


RefusalRenderer = Callable[[Scope, Refusal], Response]


def render_refusal(scope: Scope, refusal: Refusal) -> Response:
    """The one place a refusal becomes a response: `{"detail", "type"}` JSON."""
    return error(refusal.status, refusal.detail, refusal.type, refusal.headers)


@dataclass(frozen=True)
class Authority:
    """A parsed Host header (or an Origin's host part): lowercase name, IPv6 without brackets."""

    name: str
    port: int | None


def parse_authority(value: str) -> Authority | None:
    """A name or a bracketed IPv6 address with an optional numeric port, nothing else; else None."""
    match = AUTHORITY.fullmatch(value.lower())
    if match is None:
        return None
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port <= 65535:
        return None
    if match["ipv6"] is not None:
        try:
            return Authority(str(ipaddress.IPv6Address(match["ipv6"])), port)
        except ValueError:
            return None
    return Authority(match["name"].rstrip("."), port)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def same_origin(origin: str, scheme: str, host: Authority) -> bool:
    """Is `origin` this service itself: same scheme, name and port (a missing port is the default)?"""
    match = ORIGIN.fullmatch(origin.lower())
    if match is None or match["scheme"] != scheme:
        return False
    other = parse_authority(match["authority"])
    default = DEFAULT_PORTS[scheme]
    return other is not None and other.name == host.name and (other.port or default) == (host.port or default)


def top_level_navigation(scope: Scope, headers: Mapping[str, str]) -> bool:
    """A link followed in a tab: the response goes to the user's tab, never to the linking page."""
    return (
        scope.get("method") in ("GET", "HEAD")
        and headers.get("sec-fetch-mode") == "navigate"
        and headers.get("sec-fetch-dest") == "document"
    )


class Guard:
    """Refuse requests a browser could forge or a stranger could send.

    - Client: when bound to loopback (and not CHAT_ALLOW_REMOTE) only loopback peers are served.
    - Headers total at most `max_header_bytes`; those it judges appear once; Host is parsed strictly.
    - Host: when bound to loopback only loopback names are served (DNS rebinding, Ollama
      CVE-2024-28224); CHAT_ALLOWED_HOSTS adds names.
    - Origin and Sec-Fetch-Site: a browser request from another origin or site is refused unless
      CHAT_CORS_ORIGINS lists its origin (a followed link to a page is let through).
    - Body size: a Content-Length over CHAT_MAX_BODY_BYTES gets 413 before the body is read; a path
      in `body_limits` (the import's uploads) has its own limit and setting.
    - Token: with CHAT_API_TOKEN set, every path but the open ones needs it.
    Every scope type is judged: HTTP and WebSocket are checked alike, lifespan passes, others fail.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str,
        allow_remote: bool,
        allowed_hosts: Collection[str],
        cors_origins: Collection[str],
        max_body_bytes: int,
        max_header_bytes: int,
        token: str | None,
        open_paths: Collection[str],
        open_prefixes: Collection[str] = (),
        body_limits: Mapping[str, tuple[int, str]] | None = None,
        api_key_prefixes: Collection[str] = (),
        render: RefusalRenderer = render_refusal,
    ) -> None:
        self.app = app
        self.host = host
        self.loopback = is_loopback(host)
        self.allow_remote = allow_remote
        self.hosts = {h.lower() for h in allowed_hosts}
        self.origins = set(cors_origins)
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.token = token.encode() if token is not None else None
        self.open_paths = frozenset(open_paths)
        self.open_prefixes = tuple(open_prefixes)
        self.body_limits = dict(body_limits or {})
        self.api_key_prefixes = tuple(api_key_prefixes)
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        if kind not in ("http", "websocket"):
            raise RuntimeError(f"Guard does not know the ASGI scope type {kind!r}; refusing it")
        refusal = self.refuse(scope)
        if refusal is not None:
            await self.send_refusal(scope, receive, send, refusal)
        elif kind == "http":
            await self.app(scope, self.limit_body(receive, scope["path"]), send)
        else:
            await self.app(scope, receive, send)

    async def send_refusal(self, scope: Scope, receive: Receive, send: Send, refusal: Refusal) -> None:
        response = self.render(scope, refusal)
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            await response(scope, receive, send)  # Starlette sends it as a denial response
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.type})

    def body_limit(self, path: str) -> tuple[int, str]:
        """The largest body a path takes, and the setting that says so."""
        return self.body_limits.get(path) or (self.max_body_bytes, "CHAT_MAX_BODY_BYTES")

    def limit_body(self, receive: Receive, path: str) -> Receive:
        """Count a body sent without Content-Length; past the limit the route gets a 413 (JSON)."""
        received = 0
        limit = self.body_limit(path)[0]

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, self.too_large(path))
            return message

        return counted

    def too_large(self, path: str, size: str = "") -> str:
        limit, setting = self.body_limit(path)
        what = f"request body is {size} bytes" if size else "request body is too large"
        return f"{what}; the limit is {limit} bytes ({setting})"

    def refuse(self, scope: Scope) -> Refusal | None:
        """The first check this request fails, in the order SPEC.md §3.1 lists them; None if none."""
        size = sum(len(key) + len(value) + 4 for key, value in scope["headers"])  # "k: v\r\n"
        if size > self.max_header_bytes:
            return Refusal(
                431,
                f"the request's headers are {size} bytes; the limit is {self.max_header_bytes} bytes",
                "headers_too_large",
            )
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            name = key.decode("latin-1").lower()
            if name in headers and name in SINGLE_HEADERS:
                return Refusal(
                    400, f"the request has more than one {name} header; send it once", "invalid_header"
                )
            headers[name] = value.decode("latin-1")
        return (
            self.refuse_client(scope)
            or self.refuse_host(headers)
            or self.refuse_origin(scope, headers)
            or self.refuse_size_or_token(scope, headers)
        )

    def refuse_client(self, scope: Scope) -> Refusal | None:
        peer = (scope.get("client") or ("", 0))[0]
        if not self.loopback or self.allow_remote or is_loopback(peer):
            return None
        # e.g. `uvicorn main:app --host 0.0.0.0`, which skips main()'s refusal
        return Refusal(
            403,
            f"requests from {peer or 'an unknown address'} are refused: CHAT_HOST is {self.host}, so "
            f"this service answers this machine only; set CHAT_HOST and CHAT_API_TOKEN to serve others",
            "forbidden_client",
        )

    def refuse_host(self, headers: Mapping[str, str]) -> Refusal | None:
        value = headers.get("host", "")
        host = parse_authority(value)
        if host is None:
            return Refusal(
                400,
                f"the Host header {value!r} is malformed: send a name or a bracketed IPv6 address with an "
                f"optional numeric port, e.g. 'localhost:8000' or '[::1]:8000'",
                "invalid_header",
            )
        if not self.host_ok(host.name):
            return Refusal(
                403,
                f"requests for host {host.name!r} are refused; add it to CHAT_ALLOWED_HOSTS",
                "forbidden_host",
            )
        return None

    def host_ok(self, name: str) -> bool:
        if name in self.hosts:
            return True
        if not self.loopback:
            return not self.hosts
        return name in LOOPBACK_NAMES or name.endswith(".localhost") or is_loopback(name)

    def refuse_origin(self, scope: Scope, headers: Mapping[str, str]) -> Refusal | None:
        origin = headers.get("origin")
        if origin is not None and origin in self.origins:
            return None
        if origin is not None:
            host = parse_authority(headers.get("host", ""))
            scheme = str(scope["scheme"]).replace("ws", "http", 1)  # ws -> http, wss -> https
            if host is not None and same_origin(origin, scheme, host):
                return None
            return Refusal(
                403,
                f"cross-origin requests from {origin!r} are refused; add it to CHAT_CORS_ORIGINS",
                "forbidden_origin",
            )
        if headers.get("sec-fetch-site") == "cross-site" and not top_level_navigation(scope, headers):
            # a browser sent it from another site without an Origin header (e.g. a privacy setting)
            return Refusal(
                403,
                "cross-site requests are refused (Sec-Fetch-Site: cross-site, no Origin); call the API "
                "from a page on an origin listed in CHAT_CORS_ORIGINS",
                "forbidden_origin",
            )
        return None

    def refuse_size_or_token(self, scope: Scope, headers: Mapping[str, str]) -> Refusal | None:
        if scope.get("method") == "OPTIONS" and "origin" in headers:
            return None  # CORS preflight carries no credentials
        length = headers.get("content-length", "0")
        if length.isdigit() and int(length) > self.body_limit(scope["path"])[0]:
            return Refusal(413, self.too_large(scope["path"], length), "body_too_large")
        if self.token is None or self.is_open(scope["path"]):
            return None
        if self.token_ok(scope["path"], headers):
            return None
        also = " or 'x-api-key: <CHAT_API_TOKEN>'" if scope["path"].startswith(self.api_key_prefixes) else ""
        return Refusal(
            401,
            f"missing or wrong token: send the header 'Authorization: Bearer <CHAT_API_TOKEN>'{also}",
            "unauthorized",
            {"WWW-Authenticate": "Bearer"},
        )

    def token_ok(self, path: str, headers: Mapping[str, str]) -> bool:
        """`Authorization: Bearer <token>`; under an `api_key_prefixes` path (`/v1`) also `x-api-key`,
        the header the anthropic SDK and its clients send."""
        assert self.token is not None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token):
            return True
        key = headers.get("x-api-key") if path.startswith(self.api_key_prefixes) else None
        return key is not None and hmac.compare_digest(key.strip().encode(), self.token)

    def is_open(self, path: str) -> bool:
        """Open paths (exact) and everything under an open prefix (the docs' and the page's files)."""
        return path in self.open_paths or path.startswith(self.open_prefixes)


def bounded_http_protocol(max_head_bytes: int) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol (a C parser: the cheaper of its two), with the request head bounded.

    httptools buffers a request line and headers of any size before Guard can count them (a 64 MiB
    header cost 77 MiB of RSS). This protocol counts the bytes received while a request's head is
    incomplete and, past `max_head_bytes`, answers 431 and closes the connection, as h11's
    `max_incomplete_event_size` does. The read a head begins in is not counted (it may end an
    earlier request), so a head may pass the limit by one read; Guard's 431 is the exact limit.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    refusal = orjson.dumps(
        {"detail": f"the request's headers exceed {max_head_bytes} bytes", "type": "headers_too_large"}
    )
    answer = (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(refusal), refusal)
    )

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        head_bytes: int | None = None  # bytes of the request head so far; None: not inside one
        heads = 0  # request heads begun on this connection

        def data_received(self, data: bytes) -> None:
            heads = self.heads
            super().data_received(data)
            # Only a read that falls wholly inside one unfinished head counts: the read a head
            # begins in may carry the end of an earlier request (its body) and is not counted.
            if self.head_bytes is None or self.heads != heads or self.transport.is_closing():
                return
            self.head_bytes += len(data)
            if self.head_bytes > max_head_bytes:
                if self.cycle is None or self.cycle.response_complete:  # never inside another response
                    self.transport.write(answer)
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.head_bytes = 0
            self.heads += 1

        def on_headers_complete(self) -> None:
            self.head_bytes = None
            super().on_headers_complete()

    return BoundedHttpToolsProtocol
