"""What the browser tests need: Debian's Chromium (installed on a fresh machine), the service on a
real loopback port, and a page that records console errors and requests to other hosts."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

INSTALL_HINT = "the browser tests need Chromium: run `apt-get install -y chromium` (Debian/Ubuntu) as root"

# As root Chromium needs --no-sandbox; the rest keep it from calling Google's hosts, which this
# machine's closed network refuses (see the environment notes on headless Chromium).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def installed_chromium() -> str | None:
    """Debian's `chromium` if it is installed (the benchmark's check: it never installs anything)."""
    return shutil.which("chromium")


def chromium_path() -> str:
    """Debian's `chromium`; installed with apt when missing and we may; else the run stops."""
    found = installed_chromium()
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
                pytest.exit(f"{' '.join(command)} failed ({' '.join(tail)}); {INSTALL_HINT}", returncode=1)
        found = installed_chromium()
        if found:
            return found
    pytest.exit(INSTALL_HINT, returncode=1)  # never a skip: in CI a missing browser is a failure


class Served:
    """The app under uvicorn on 127.0.0.1 (OS-chosen port) in a thread of this process."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_config=None, ws="none", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="page-server", daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 60  # a generous bound on start-up, not a measurement
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"


@dataclass
class Watch:
    """What a page did that it should not: console errors, uncaught exceptions, foreign requests."""

    origin: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)

    def attach(self, context: Any) -> None:
        def on_page(page: Any) -> None:
            page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: self.page_errors.append(str(e)))

        context.on("page", on_page)
        context.on("request", self.on_request)

    def on_request(self, request: Any) -> None:
        url: str = request.url
        if not url.startswith(self.origin + "/") and not url.startswith(("blob:", "data:")):
            self.foreign_requests.append(url)

    def assert_clean(self) -> None:
        assert self.page_errors == []
        assert self.console_errors == []
        assert self.foreign_requests == []


@contextmanager
def browser_context(browser: Any, origin: str, **options: Any) -> Iterator[tuple[Any, Watch]]:
    context = browser.new_context(**options)
    watch = Watch(origin)
    watch.attach(context)
    try:
        yield context, watch
    finally:
        context.close()
