"""The documents stay true: SPEC.md's endpoint table is the app's routes; CI runs the README's command."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute

ROOT = Path(__file__).resolve().parent.parent


def spec_endpoints() -> set[tuple[str, str]]:
    text = (ROOT / "SPEC.md").read_text()
    section = text.split("### 3.1", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\|\s*EP-[^|]+\|\s*([A-Z]+)\s*\|\s*`?([^|`\s]+)`?\s*\|", section, flags=re.M)
    return {(method, path) for method, path in rows}


def api_routes(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, APIRoute]]:
    """Every APIRoute with its full path, also those of included routers (FastAPI keeps those in an
    `_IncludedRouter` holding the original router and the prefix)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from api_routes(included.routes, prefix + route.include_context.prefix)  # type: ignore[attr-defined]


def test_spec_endpoint_table_matches_the_routes(client: TestClient) -> None:
    routes = {
        (method, path)
        for path, route in api_routes(client.app.routes)  # type: ignore[attr-defined]
        for method in route.methods or ()
    }
    assert spec_endpoints() == routes


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [
        block.strip()
        for heading in ("## Run it", "## Test it")
        for block in re.findall(
            r"```sh\n(.*?)```", text.split(heading, 1)[1].split("\n## ", 1)[0], flags=re.S
        )
    ]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    run, test = readme_commands()
    assert run.startswith("python3 -m venv .venv && ") and run.endswith(".venv/bin/python main.py")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci
    for gate in ("ruff check", "ruff format --check", "mypy", "pytest"):
        assert gate in test
