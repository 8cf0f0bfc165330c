"""The processes of a run, all on 127.0.0.1 with ports chosen by the OS: the fake upstream, the
service (one or more), the health probe. Every child is started in a session of its own and ended
with its own children at the end of the run, also on Ctrl-C and SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import psutil

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-key-0123456789"
MODELS = {"openai": "fake-gpt-1", "anthropic": "claude-fake-1"}

# Variables the service, the SDKs or LiteLLM read: none may come from the machine running the run.
ENV_PREFIXES = ("OPENAI_", "ANTHROPIC_", "CHAT_", "OLLAMA_", "LITELLM_", "DATABASE_")
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES) and k not in PROXY_VARS}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


class Children:
    """Every child process of the run, so that each one is ended at the end."""

    def __init__(self) -> None:
        self.procs: list[psutil.Popen] = []

    def spawn(self, args: list[str], **kwargs: Any) -> psutil.Popen:
        # A session of its own: Ctrl-C reaches only the harness, which then ends the children.
        proc = psutil.Popen(args, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: psutil.Popen, timeout: float = 10.0) -> None:
        """SIGTERM to the child and its own children, SIGKILL to whatever is left after `timeout`."""
        with contextlib.suppress(psutil.NoSuchProcess):
            family = [proc, *proc.children(recursive=True)]
            for member in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.terminate()
            _, alive = psutil.wait_procs(family, timeout=timeout)
            for member in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            psutil.wait_procs(alive, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)  # reap it
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def loop_cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process's main thread (the service's event loop; its
    other threads are worker threads: storage's writes, the index, the usage ledger)."""
    try:
        threads = psutil.Process(pid).threads()
    except psutil.NoSuchProcess:
        return 0.0
    return sum(float(t.user_time + t.system_time) for t in threads if t.id == pid)


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB; VmHWM, the peak, is Linux's and not in psutil."""
    try:
        rss = psutil.Process(pid).memory_info().rss / 2**20
        status = Path(f"/proc/{pid}/status").read_text()
    except (psutil.NoSuchProcess, OSError):
        return 0.0, 0.0
    peak = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
    return rss, (int(peak[0]) / 1024 if peak else 0.0)


@dataclass
class Upstream:
    proc: psutil.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def spawn_listening(children: Children, module: str, args: list[str], log: Path, what: str) -> Upstream:
    """`python -m module --port 0 ...`, which prints `PORT <n>` once it listens."""
    proc = children.spawn(
        [sys.executable, "-m", module, "--port", "0", *args],
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        raise RuntimeError(f"{what} did not start: {line!r}")
    return Upstream(proc, int(line.split()[1]))


def start_upstream(children: Children, log: Path) -> Upstream:
    """`bench.upstream`: the test suite's fake OpenAI/Anthropic server, reply chosen by the request."""
    return spawn_listening(children, "bench.upstream", [], log, "the fake upstream")


def start_floor(children: Children, upstream: Upstream, log: Path) -> str:
    """`bench.floor`, the least a Python proxy on this stack adds; its URL."""
    return spawn_listening(children, "bench.floor", ["--upstream", upstream.url], log, "the floor proxy").url


@dataclass
class Service:
    proc: psutil.Popen
    port: int
    data_dir: Path
    log_path: Path
    launched: float  # time.perf_counter() at launch
    started_in: float = 0.0  # seconds from launch to ready

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return int(self.proc.pid)


def service_env(upstream: Upstream, data_dir: Path, port: int, log_level: str) -> dict[str, str]:
    return clean_env(
        CHAT_HOST="127.0.0.1",
        CHAT_PORT=str(port),
        CHAT_DATA_DIR=str(data_dir),
        CHAT_LOG_LEVEL=log_level,
        CHAT_DEFAULT_MODEL="openai/" + MODELS["openai"],
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=upstream.url + "/v1",
        ANTHROPIC_API_KEY=API_KEY,
        ANTHROPIC_BASE_URL=upstream.url,
    )


def spawn_service(
    children: Children,
    service_dir: Path,
    env: dict[str, str],
    data_dir: Path,
    log_path: Path,
    launch_args: list[str],
) -> Service:
    """`main.py` through `bench/launch.py` (which can switch an optimisation off); cwd is the run
    directory, so no stray `.env` is read."""
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = children.spawn(
        [sys.executable, str(ROOT / "bench" / "launch.py"), str(service_dir), *launch_args],
        cwd=log_path.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
    )
    return Service(proc, int(env["CHAT_PORT"]), data_dir, log_path, started)


async def wait_ready(
    proc: psutil.Popen, url: str, log_path: Path, started: float, timeout: float = 60
) -> float:
    """Poll `url` until it answers 200; seconds since `started` (a `time.perf_counter()`)."""
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0), trust_env=False) as poll:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"exited with {proc.returncode} before {url} answered:\n{tail}")
            with contextlib.suppress(httpx2.TransportError):
                if (await poll.get(url)).status_code == 200:
                    return time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")
            await asyncio.sleep(0.002)


def start_probe(children: Children, url: str, gap: float, count: int = 0) -> psutil.Popen:
    """`bench.probe` in a process of its own: GETs one after the other, `gap` seconds apart, so that
    neither the load generator's event loop nor its GIL is in the latencies measured."""
    return children.spawn(
        [sys.executable, "-m", "bench.probe", url, "--gap", str(gap), "--count", str(count)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
