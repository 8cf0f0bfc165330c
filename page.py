"""The service's own web page: `GET /` and the files under `static/`, served without the token.

The files hold no data (every conversation comes from the API, which still needs the token), so
`Guard` lets `OPEN_PATHS` and `OPEN_PREFIX` through. They are read once at import into memory: a
request never touches the disk and no request path ever becomes a file path (only the names found
under `static/` are served). Every answer carries the strict headers in `HEADERS`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import Response

from web import error

STATIC = Path(__file__).resolve().parent / "static"
OPEN_PATHS = frozenset({"/"})
OPEN_PREFIX = "/static/"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidate with the ETag: an updated page shows at once
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}


@dataclass(frozen=True)
class File:
    body: bytes
    media_type: str
    etag: str


def load(root: Path = STATIC) -> dict[str, File]:
    """Every servable file under `root`, by its path relative to it (`vendor/marked.esm.js`)."""
    files = {}
    for path in sorted(root.rglob("*")):
        media_type = TYPES.get(path.suffix)
        if path.is_file() and media_type is not None:
            body = path.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            files[path.relative_to(root).as_posix()] = File(body, media_type, etag)
    return files


FILES = load()
router = APIRouter(tags=["page"])


def serve(request: Request, name: str) -> Response:
    file = FILES.get(name)
    if file is None:
        return error(404, f"no file /static/{name}; the page is at /", "not_found", headers=HEADERS)
    headers = {**HEADERS, "ETag": file.etag}
    if request.headers.get("if-none-match") == file.etag:
        return Response(status_code=304, headers=headers)
    return Response(file.body, media_type=file.media_type, headers=headers)


@router.get("/", include_in_schema=False)
async def index(request: Request) -> Response:
    """The chat page."""
    return serve(request, "index.html")


@router.get("/static/{name:path}", include_in_schema=False)
async def static_file(name: str, request: Request) -> Response:
    """The page's scripts, styles and vendored libraries."""
    return serve(request, name)
