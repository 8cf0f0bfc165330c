"""The documents stay true: SPEC.md's endpoint table is the app's routes; CI runs the README's command."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent


def spec_endpoints() -> set[tuple[str, str]]:
    text = (ROOT / "SPEC.md").read_text()
    section = text.split("### 3.1", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\|\s*EP-[^|]+\|\s*([A-Z]+)\s*\|\s*`?([^|`\s]+)`?\s*\|", section, flags=re.M)
    return {(method, path) for method, path in rows}


def test_spec_endpoint_table_matches_the_routes(client: TestClient) -> None:
    # The OpenAPI paths, not app.routes: FastAPI 0.165 keeps an included router's routes inside it.
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    routes = {(method.upper(), path) for path, operations in paths.items() for method in operations}
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
