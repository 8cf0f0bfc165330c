"""What every route module shares: JSON responses, the error body, and the app's dependencies.

`main.py` holds the service's own routes; a capability with routes of its own (search, import and
export, the `/v1` wire formats, the page) keeps them in its module as an `APIRouter` and takes
these pieces from here, so that no module imports `main`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Annotated, Any

import anyio
import orjson
from fastapi import Depends, Request
from starlette.responses import Response
from starlette.types import Receive

from providers import ProviderError, ProviderTable
from storage import Store


class APIError(Exception):
    """An error a route answers with: its status and `type` live on the class, `detail` says what to do."""

    status_code = 400
    type = "bad_request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error(
    status: int, detail: str, kind: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSON:
    """The API's error body: `{"detail": what was wrong and how to fix it, "type": what to branch on}`."""
    return JSON({"detail": detail, "type": kind, **extra}, status_code=status, headers=headers)


# async: FastAPI runs plain `def` dependencies in the thread pool, a thread hop each per request
async def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def get_table(request: Request) -> ProviderTable:
    table: ProviderTable = request.app.state.providers
    return table


StoreDep = Annotated[Store, Depends(get_store)]
TableDep = Annotated[ProviderTable, Depends(get_table)]


def provider_error_response(exc: ProviderError, **extra: Any) -> JSON:
    headers = {"Retry-After": exc.retry_after} if exc.retry_after is not None else None
    return error(exc.status_code, exc.detail, exc.type, headers, **extra)


def json_body(headers: Mapping[str, str]) -> bool:
    """Is there no body, or one declared JSON (`application/json` or `application/*+json`)?"""
    if headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers:
        return True
    media = headers.get("content-type", "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def client_key(request: Request) -> str:
    """Whom a rate limit counts: the bearer token when one is set, else the peer's address."""
    if request.app.state.settings.api_token is not None:
        return request.headers.get("authorization", "")
    return request.client.host if request.client else ""


@contextlib.asynccontextmanager
async def until_disconnect(
    receive: Receive, gone: Callable[[], object] = lambda: None
) -> AsyncIterator[anyio.CancelScope]:
    """A cancel scope that is cancelled, after `gone()` is called, when the client goes away.

    The watcher is a plain task, cancelled on the way out: an anyio task group's cancel costs ten
    times more per request (its message describes the cancelling task, whose repr walks its stack).
    """
    with anyio.CancelScope() as scope:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone()
            scope.cancel()

        watcher = asyncio.create_task(watch())
        try:
            yield scope
        finally:
            watcher.cancel()
