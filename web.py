"""What every route module shares: JSON responses, the error body, and the app's dependencies.

`main.py` holds the service's own routes; a capability with routes of its own (search, import and
export, the `/v1` wire formats, the page) keeps them in its module as an `APIRouter` and takes
these pieces from here, so that no module imports `main`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from starlette.responses import Response

from providers import ProviderTable
from storage import Store


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
