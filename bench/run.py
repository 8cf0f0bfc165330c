"""Benchmark of the chat service against a zero-latency fake upstream, in one command.

    .venv/bin/python -m bench.run                 # everything (a few minutes on 2 cores)
    .venv/bin/python -m bench.run --quick         # fewer samples, for a smoke run
    .venv/bin/python -m bench.run --scenario 2    # one scenario (repeat the flag for more)
    .venv/bin/python -m bench.run --profile       # also record py-spy profiles of the service
    .venv/bin/python -m bench.profile bench/results/profile-s1-gil.txt   # summarise one

The fake upstream (`bench.upstream`: the test suite's fake OpenAI/Anthropic server, with the reply
chosen by the request) and the service (`python main.py`) run as their own processes on loopback;
this process is the load generator (httpx2, one event loop). Every figure that has a baseline is
measured against it in the same run, back to back, after a warm-up:

1. non-streaming turns, concurrency 1/4/16, each worker keeping its own conversation; baseline:
   the same exchange made directly with the fake (the streaming request the service makes, with
   the same growing history). Beside it: the cost of a bare durable write (`storage.write_durably`).
2. streaming replies of 1/50/1,000/5,000 chunks, in rounds of every size; baseline: a plain
   streaming read of the same reply from the fake; marginal cost per chunk between sizes.
3. `/api/health` latency while 100 streams of ~50 chunks/s run (probed by `bench.probe` from a
   process of its own); baseline: health at idle; the same 100 streams read straight from the fake.
4. storage: append to conversations of 10/100/1,000 messages (in-process `Store`; baseline: two
   bare durable writes of the same file), a turn through the API on a 1,000-message conversation,
   the first page of the listing with 100/1,000/10,000 conversations, opening a 1,000-message one.
5. cold start to the first 200 on /api/health, and resident memory.

Prints the tables (Markdown) and writes a JSON of the results to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx2
import orjson

import search_index
import storage

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
API_KEY = "bench-key-0123456789"
MODELS = {"openai": "fake-gpt-1", "anthropic": "claude-fake-1"}
Format = Literal["openai", "anthropic"]
T = TypeVar("T")

# Variables the service or the SDKs read: none may come from the machine running the benchmark.
ENV_PREFIXES = ("OPENAI_", "ANTHROPIC_", "CHAT_", "OLLAMA_")
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

WORDS_TEXT = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
    "under pale moonlight and every answer needs context memory patience careful reading"
)
WORDS = WORDS_TEXT.split()


# --- numbers ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Stats:
    """Latency statistics in milliseconds."""

    p50: float
    p99: float
    mean: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        ms = [s * 1000 for s in seconds]
        return cls(percentile(ms, 50), percentile(ms, 99), sum(ms) / len(ms) if ms else float("nan"), len(ms))

    def cell(self) -> str:
        return f"{fmt_ms(self.p50)} / {fmt_ms(self.p99)}"


def fmt_ms(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


# --- what gets printed --------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    direct: str = "-"
    service: str = "-"
    added: str = "-"
    ratio: str = "-"
    note: str = ""


@dataclass
class Target:
    name: str
    goal: str
    measured: str = "-"
    ok: bool | None = None  # None: not measured (error or scenario not run)

    @property
    def verdict(self) -> str:
        return "n/a" if self.ok is None else ("PASS" if self.ok else "FAIL")


def latency_row(name: str, direct: Stats | None, service: Stats, note: str = "") -> Row:
    row = Row(name, service=service.cell(), note=note)
    if direct is not None:
        row.direct = direct.cell()
        row.added = f"{fmt_ms(service.p50 - direct.p50)} / {fmt_ms(service.p99 - direct.p99)}"
        row.ratio = f"{service.p50 / direct.p50:.2f}x" if direct.p50 > 0 else "-"
    return row


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


# --- processes ----------------------------------------------------------------------------------


class Processes:
    """Every child process of the run, so that each one is ended at the end (also on Ctrl-C)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        # A session of its own: Ctrl-C reaches only this process, which then ends the children.
        proc: subprocess.Popen[bytes] = subprocess.Popen(args, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (Linux: write 5 to clear_refs); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def machine_info() -> dict[str, str]:
    info = {
        "nproc": str(os.cpu_count()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with contextlib.suppress(OSError):
        info["load_before"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        info["commit"] = head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    return info


# --- conversations made directly on disk --------------------------------------------------------


def text_of(chars: int, rng: random.Random) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:chars]


def make_conversation(messages: int, chars: int, model: str, rng: random.Random) -> storage.Conversation:
    """A conversation of alternating user/assistant messages of about `chars` characters each."""
    conversation = storage.new_conversation(
        model=model, system=None, params={"temperature": None, "max_tokens": None}, title="bench"
    )
    parent: str | None = None
    for i in range(messages):
        message: storage.Message = {
            "id": storage.new_id(),
            "parent_id": parent,
            "role": "user" if i % 2 == 0 else "assistant",
            "content": text_of(chars, rng),
            "created_at": storage.now(),
        }
        if message["role"] == "assistant":
            message["model"] = model
            message["params"] = {"temperature": None, "max_tokens": None}
            message["status"] = "complete"
            message["finish_reason"] = "stop"
            message["usage"] = {"input_tokens": 10, "output_tokens": 100}
            message["error"] = None
        conversation["messages"].append(message)
        parent = message["id"]
    conversation["current_id"] = parent
    return conversation


def write_plain(path: Path, data: bytes) -> None:
    """Set-up only: no fsync (the page cache is what a warm service reads anyway)."""
    path.write_bytes(data)


def prepare_listing_dir(data_dir: Path, count: int, rng: random.Random) -> None:
    conversations = data_dir / "conversations"
    conversations.mkdir(parents=True, exist_ok=True)
    for _ in range(count):
        conversation = make_conversation(2, 200, "openai/" + MODELS["openai"], rng)
        write_plain(conversations / f"{conversation['id']}.json", storage.encode(conversation))


def placeholder_reply(model: str) -> Callable[[storage.Conversation], storage.Message]:
    def make_reply(conversation: storage.Conversation) -> storage.Message:
        return storage.placeholder_reply(model, {"temperature": None, "max_tokens": None})

    return make_reply


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path
    started_in: float = 0.0  # seconds from launch to ready

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Plan:
    """Sample counts: the default run, or --quick."""

    s1_turns_c1: int = 200
    s1_turns_c1_anthropic: int = 100
    s1_turns: dict[int, int] = field(default_factory=lambda: {4: 60, 16: 25})  # per worker
    s1_blocks: int = 2  # direct/service alternations per measurement
    s1_write_samples: int = 100
    s2_sizes: tuple[int, ...] = (1, 50, 1000, 5000)
    s2_rounds: int = 25
    s3_streams: int = 100
    s3_chunks: int = 250  # at 0.02 s per chunk: 5 s per stream
    s3_idle_samples: int = 200
    s4_listing: tuple[int, ...] = (100, 1000, 10000)
    s4_warm_samples: int = 100
    s4_append: dict[int, int] = field(default_factory=lambda: {10: 50, 100: 50, 1000: 30})
    s4_open_samples: int = 50
    s4_api_turns: int = 20
    s5_launches: int = 5

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            s1_turns_c1=50,
            s1_turns_c1_anthropic=30,
            s1_turns={4: 15, 16: 8},
            s1_blocks=1,
            s1_write_samples=30,
            s2_rounds=5,
            s3_chunks=100,
            s3_idle_samples=50,
            s4_warm_samples=20,
            s4_append={10: 10, 100: 10, 1000: 10},
            s4_open_samples=10,
            s4_api_turns=5,
            s5_launches=3,
        )


# per size: direct first delta, service first delta, direct total, service total (s), delta events
S2Samples = tuple[list[float], list[float], list[float], list[float], list[float]]


class StreamFailed(Exception):
    pass


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, run_dir: Path) -> None:
        self.args = args
        self.plan = Plan.quick() if args.quick else Plan()
        self.procs = procs
        self.run_dir = run_dir
        self.service_dir: Path = args.service_dir.resolve()
        self.rows: list[Row] = []
        self.targets: dict[str, Target] = {
            "c1_p50": Target(
                "Non-streaming turn, c=1: added p50", "<= its 2 durable writes + 2 ms (same file size)"
            ),
            "c1_p99": Target("Non-streaming turn, c=1: added p99", "< 10 ms"),
            "c16_rate": Target("Non-streaming turns, c=16", ">= 150 turns/s"),
            "ttfd": Target("Streaming: time to first delta, added p50 (worst size)", "< 5 ms"),
            "relay_5000": Target("Streaming 5,000 chunks: total vs direct (p50)", "<= 1.5x"),
            "flat": Target(
                "Streaming: cost per chunk stays flat, 50 -> 5,000 chunks",
                "us/chunk 1,000->5,000 <= 1.5x us/chunk 50->1,000",
            ),
            "health_load": Target("/api/health p99 with 100 streams running", "< 20 ms"),
            "listing": Target("First page of the listing, 10,000 conversations (warm p50)", "< 10 ms"),
            "append_1000": Target("Append to a 1,000-message conversation (p50, durable)", "< 15 ms"),
            "cold_start": Target("Cold start to healthy (median)", "< 1 s"),
            "idle_rss": Target("Idle RSS", "< 80 MB"),
        }
        self.results: dict[str, Any] = {}
        self.errors: list[str] = []
        self.upstream_port = 0
        self.upstream_pid = 0
        self.service: Service | None = None
        self.client = httpx2.AsyncClient(
            timeout=httpx2.Timeout(60.0),
            limits=httpx2.Limits(max_connections=300, max_keepalive_connections=300),
            trust_env=False,
        )
        self.rng = random.Random(1234)
        self.profiler: subprocess.Popen[bytes] | None = None
        self.profiles: dict[str, str] = {}

    # --- processes ------------------------------------------------------------------------------

    def start_upstream(self) -> None:
        proc = self.procs.spawn(
            [sys.executable, "-m", "bench.upstream", "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=open(self.run_dir / "upstream.log", "wb"),  # noqa: SIM115 - the child keeps it
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the fake upstream did not start: {line!r}")
        self.upstream_port = int(line.split()[1])
        self.upstream_pid = proc.pid

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    def service_env(self, data_dir: Path, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES) and k not in PROXY_VARS}
        env.update(
            CHAT_HOST="127.0.0.1",
            CHAT_PORT=str(port),
            CHAT_DATA_DIR=str(data_dir),
            CHAT_LOG_LEVEL=self.args.log_level,
            CHAT_DEFAULT_MODEL="openai/" + MODELS["openai"],
            OPENAI_API_KEY=API_KEY,
            OPENAI_BASE_URL=self.upstream_url + "/v1",
            ANTHROPIC_API_KEY=API_KEY,
            ANTHROPIC_BASE_URL=self.upstream_url,
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        for name in ("ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_PROFILE", "ANTHROPIC_CUSTOM_HEADERS"):
            env.pop(name, None)
        return env

    async def launch_service(self, data_dir: Path, ready_path: str = "/api/health") -> Service:
        """Start `python main.py` and wait for the first 200 on `ready_path`."""
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log_path = self.run_dir / f"service-{port}.log"
        # cwd: the run directory, so that no stray .env is read; main.py's folder is on sys.path.
        started = time.perf_counter()
        proc = self.procs.spawn(
            [sys.executable, str(self.service_dir / "main.py")],
            cwd=self.run_dir,
            env=self.service_env(data_dir, port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(log_path, "wb"),  # noqa: SIM115 - the child keeps it
        )
        service = Service(proc, port, data_dir, log_path)
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0), trust_env=False) as poll:
            deadline = started + 60
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the service exited with {proc.returncode}:\n{tail}")
                try:
                    response = await poll.get(service.url + ready_path)
                    if response.status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError("the service did not become ready in 60 s")
                await asyncio.sleep(0.002)
        service.started_in = time.perf_counter() - started
        return service

    def stop_service(self, service: Service) -> None:
        self.procs.stop(service.proc)

    async def main_service(self) -> Service:
        """The service that scenarios 1-4 share, started once and warmed up."""
        if self.service is None or self.service.proc.poll() is not None:
            self.service = await self.launch_service(self.run_dir / "main-data")
            for fmt in ("openai", "anthropic"):  # imports the SDKs, opens the upstream connections
                conversation: str | None = None
                for i in range(5):
                    conversation = await self.service_turn(fmt, conversation, f"warm-up {i}")
        return self.service

    # --- profiling ------------------------------------------------------------------------------

    def start_profile(self, name: str) -> None:
        if not self.args.profile or self.service is None:
            return
        py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if py_spy is None:
            print("--profile: py-spy not found (pip install py-spy)", file=sys.stderr)
            return
        RESULTS_DIR.mkdir(exist_ok=True)
        out = RESULTS_DIR / f"profile-{name}-{self.args.profile}.txt"
        self.profiler = subprocess.Popen(  # not in self.procs: stopped with SIGINT so that it writes
            [
                *(py_spy, "record", "--pid", str(self.service.pid), "--rate", "250", "--format", "raw"),
                *("--full-filenames", "--nonblocking", "--output", str(out)),
                *(["--gil"] if self.args.profile == "gil" else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.profiles[name] = str(out)

    def stop_profile(self) -> None:
        if self.profiler is not None:
            self.procs.procs.append(self.profiler)
            self.procs.stop(self.profiler, sig=signal.SIGINT, timeout=30)
            self.profiler = None

    # --- the exchanges --------------------------------------------------------------------------

    def upstream_request(self, fmt: Format, history: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
        """The request the service makes upstream for this history (URL, JSON body)."""
        if fmt == "openai":
            body = {
                "model": MODELS["openai"],
                "messages": history,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            return self.upstream_url + "/v1/chat/completions", body
        body = {"model": MODELS["anthropic"], "max_tokens": 4096, "messages": history, "stream": True}
        return self.upstream_url + "/v1/messages", body

    def upstream_headers(self, fmt: Format) -> dict[str, str]:
        if fmt == "openai":
            return {"Authorization": f"Bearer {API_KEY}"}
        return {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}

    async def direct_stream(
        self, fmt: Format, history: list[dict[str, str]]
    ) -> tuple[float, float, int, str | None]:
        """Stream one reply straight from the fake: (time to first delta, total, deltas, text)."""
        url, body = self.upstream_request(fmt, history)
        started = time.perf_counter()
        first = 0.0
        deltas = 0
        parts: list[str] = []
        async with self.client.stream("POST", url, json=body, headers=self.upstream_headers(fmt)) as response:
            if response.status_code != 200:
                raise StreamFailed(f"upstream answered {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if fmt == "openai":
                    if line == "data: [DONE]":
                        break
                    if '"delta":{"content":' not in line:
                        continue
                    parts.append(orjson.loads(line[6:])["choices"][0]["delta"]["content"])
                else:
                    if '"type":"message_stop"' in line:
                        break
                    if '"text_delta"' not in line:
                        continue
                    parts.append(orjson.loads(line[6:])["delta"]["text"])
                deltas += 1
                if deltas == 1:
                    first = time.perf_counter() - started
            else:
                raise StreamFailed("the upstream stream ended before its end marker")
        return first, time.perf_counter() - started, deltas, "".join(parts)

    async def direct_turn(self, fmt: Format, history: list[dict[str, str]], text: str) -> None:
        """A turn made directly with the fake; the history grows like the service's conversation."""
        history.append({"role": "user", "content": text})
        _, _, _, reply = await self.direct_stream(fmt, history)
        history.append({"role": "assistant", "content": reply or ""})

    async def service_turn(self, fmt: str, conversation: str | None, text: str) -> str:
        """A non-streaming turn through the service; returns the conversation id."""
        assert self.service is not None
        body: dict[str, Any] = {"message": text, "model": f"{fmt}/{MODELS[fmt]}"}
        if conversation is not None:
            body["conversation_id"] = conversation
        response = await self.client.post(self.service.url + "/api/chat", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"POST /api/chat answered {response.status_code}: {response.text[:300]}")
        conversation_id: str = orjson.loads(response.content)["conversation_id"]
        return conversation_id

    async def service_stream(self, fmt: Format, text: str) -> tuple[float, float, int]:
        """A streaming turn through the service: (time to first delta, total, delta events)."""
        assert self.service is not None
        body = {"message": text, "model": f"{fmt}/{MODELS[fmt]}", "stream": True}
        started = time.perf_counter()
        first = 0.0
        deltas = 0
        event = ""
        async with self.client.stream("POST", self.service.url + "/api/chat", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise StreamFailed(f"POST /api/chat answered {response.status_code}: {response.text[:300]}")
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "delta":
                        deltas += 1
                        if deltas == 1:
                            first = time.perf_counter() - started
                    elif event == "done":
                        break
                    elif event == "error":
                        raise StreamFailed(f"the service sent an error event: {line[6:300]}")
            else:
                raise StreamFailed(
                    "the service's stream ended without a `done` event "
                    f"(deltas received: {deltas}; see {self.service.log_path.name})"
                )
        return first, time.perf_counter() - started, deltas

    # --- helpers --------------------------------------------------------------------------------

    def error(self, scenario: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:200]
        self.errors.append(f"{scenario}: {message}")
        self.rows.append(Row(scenario, note=f"ERROR {message}"))
        print(f"  ! {scenario}: {message}", file=sys.stderr, flush=True)

    async def attempt(self, scenario: str, work: Callable[[], Awaitable[T]]) -> T | None:
        try:
            return await work()
        except Exception as exc:
            self.error(scenario, exc)
            return None

    # --- 1: non-streaming turns -----------------------------------------------------------------

    async def scenario_1(self) -> None:
        await self.main_service()
        plan = self.plan
        levels: list[tuple[Format, int, int]] = [("openai", 1, plan.s1_turns_c1)]
        levels += [("anthropic", 1, plan.s1_turns_c1_anthropic)]
        levels += [("openai", c, n) for c, n in plan.s1_turns.items()]
        for fmt, concurrency, turns in levels:
            name = f"1 turn, c={concurrency} ({fmt})"
            await self.attempt(name, functools.partial(self.s1_level, name, fmt, concurrency, turns))
        await self.attempt("1 durable write", self.s1_writes)

    async def s1_level(self, name: str, fmt: Format, concurrency: int, turns: int) -> None:
        histories: list[list[dict[str, str]]] = [[] for _ in range(concurrency)]
        conversations: list[str | None] = [None] * concurrency

        async def run(direct: bool, per_worker: int) -> tuple[list[float], float]:
            latencies: list[float] = []

            async def worker(w: int) -> None:
                for i in range(per_worker):
                    text = f"worker {w} turn {i}: how is the weather today, and what should I cook tonight?"
                    started = time.perf_counter()
                    if direct:
                        await self.direct_turn(fmt, histories[w], text)
                    else:
                        conversations[w] = await self.service_turn(fmt, conversations[w], text)
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
            return latencies, time.perf_counter() - started

        await run(True, 3)  # warm-up: connections, and every worker's conversation exists
        await run(False, 3)
        first_size = self.conversation_size(conversations[0])
        blocks = self.plan.s1_blocks
        direct: list[float] = []
        service: list[float] = []
        direct_wall = service_wall = service_cpu = 0.0
        assert self.service is not None
        for block in range(blocks):
            per_worker = turns // blocks + (1 if block < turns % blocks else 0)
            latencies, wall = await run(True, per_worker)
            direct += latencies
            direct_wall += wall
            cpu_before = cpu_seconds(self.service.pid)
            latencies, wall = await run(False, per_worker)
            service_cpu += cpu_seconds(self.service.pid) - cpu_before
            service += latencies
            service_wall += wall
        d, s = Stats.of(direct), Stats.of(service)
        direct_rate, service_rate = len(direct) / direct_wall, len(service) / service_wall
        last_size = self.conversation_size(conversations[0])
        note = (
            f"turns/s: direct {direct_rate:.0f}, service {service_rate:.0f}; "
            f"{len(service)} turns; service CPU {100 * service_cpu / service_wall:.0f}% of a core, "
            f"{1000 * service_cpu / len(service):.1f} ms CPU per turn; "
            f"file {first_size // 1024}->{last_size // 1024} KB"
        )
        if concurrency == 1 and len(service) >= 40:  # how the cost grows with the history
            early = Stats.of(service[:20]).p50 - Stats.of(direct[:20]).p50
            late = Stats.of(service[-20:]).p50 - Stats.of(direct[-20:]).p50
            note += f"; added p50 over the first 20 turns {fmt_ms(early)}, last 20 turns {fmt_ms(late)}"
        self.rows.append(latency_row(name, d, s, note))
        key = f"s1_{fmt}_c{concurrency}"
        self.results[key] = {
            "direct": asdict(d),
            "service": asdict(s),
            "direct_turns_per_s": direct_rate,
            "service_turns_per_s": service_rate,
            "file_bytes_first": first_size,
            "file_bytes_last": last_size,
            "service_cpu_ms_per_turn": 1000 * service_cpu / len(service),
            "service_cpu_share": service_cpu / service_wall,
        }
        if concurrency == 16 and fmt == "openai":
            target = self.targets["c16_rate"]
            target.measured = f"{service_rate:.0f} turns/s (direct {direct_rate:.0f})"
            target.ok = service_rate >= 150

    def conversation_size(self, conversation: str | None) -> int:
        if self.service is None or conversation is None:
            return 0
        path = self.service.data_dir / "conversations" / f"{conversation}.json"
        return path.stat().st_size if path.exists() else 0

    async def s1_writes(self) -> None:
        """Bare durable writes on the service's file system, beside the c=1 turn they compare to."""
        c1 = self.results.get("s1_openai_c1")
        matched = (c1["file_bytes_first"] + c1["file_bytes_last"]) // 2 if c1 else 0
        folder = self.run_dir / "writes"
        folder.mkdir(exist_ok=True)
        sizes = [10 * 1024] + ([matched] if matched else [])
        for size in sizes:
            data = os.urandom(size // 2).hex().encode()[:size]
            path = folder / "conversation.json"
            samples = []
            for _ in range(self.plan.s1_write_samples):
                started = time.perf_counter()
                storage.write_durably(path, data)
                samples.append(time.perf_counter() - started)
            stats = Stats.of(samples)
            self.results[f"s1_write_{size}"] = asdict(stats)
            label = "~10 KB" if size == 10 * 1024 else f"{size // 1024} KB (mean file size of the c=1 turn)"
            self.rows.append(
                Row(
                    f"1 bare durable write, {label}",
                    service=stats.cell(),
                    note="storage.write_durably: temp file, write, fsync, os.replace, fsync dir",
                )
            )
        if c1:
            write = self.results[f"s1_write_{matched}"]["p50"]
            ten_kb = self.results[f"s1_write_{10 * 1024}"]["p50"]
            added_p50 = c1["service"]["p50"] - c1["direct"]["p50"]
            added_p99 = c1["service"]["p99"] - c1["direct"]["p99"]
            target = self.targets["c1_p50"]
            target.measured = (
                f"added {fmt_ms(added_p50)} ms vs 2 writes {fmt_ms(2 * write)} ms "
                f"({matched // 1024} KB; at 10 KB: {fmt_ms(2 * ten_kb)} ms)"
            )
            target.ok = added_p50 <= 2 * write + 2.0
            target = self.targets["c1_p99"]
            target.measured = f"{fmt_ms(added_p99)} ms"
            target.ok = added_p99 < 10.0

    # --- 2: streaming ---------------------------------------------------------------------------

    async def scenario_2(self) -> None:
        await self.main_service()
        ttfd: dict[int, list[str]] = {}
        worst_ttfd: float | None = None
        for fmt in ("openai", "anthropic"):
            samples = await self.attempt(f"2 streaming ({fmt})", functools.partial(self.s2_rounds, fmt))
            if samples is None:
                continue
            for chunks, (d_first, s_first, d_total, s_total, events) in samples.items():
                df, sf, dt, st = Stats.of(d_first), Stats.of(s_first), Stats.of(d_total), Stats.of(s_total)
                deltas = int(percentile([float(e) for e in events], 50))
                self.rows.append(latency_row(f"2 stream {chunks:,} chunks ({fmt}): first delta", df, sf))
                rate = chunks / (st.p50 / 1000)
                self.rows.append(
                    latency_row(
                        f"2 stream {chunks:,} chunks ({fmt}): total",
                        dt,
                        st,
                        f"{rate:,.0f} chunks/s relayed; {st.p50 * 1000 / chunks:.1f} us/chunk all-in; "
                        f"{deltas} delta events (coalesced)",
                    )
                )
                self.results[f"s2_{fmt}_{chunks}"] = {
                    "direct_first": asdict(df),
                    "service_first": asdict(sf),
                    "direct_total": asdict(dt),
                    "service_total": asdict(st),
                    "chunks_per_s": rate,
                    "delta_events_median": deltas,
                }
                if chunks > 1:
                    added = sf.p50 - df.p50
                    worst_ttfd = added if worst_ttfd is None else max(worst_ttfd, added)
                    ttfd.setdefault(chunks, []).append(fmt_ms(added))
                if chunks == 5000:
                    target = self.targets["relay_5000"]
                    ratio = st.p50 / dt.p50
                    measured = f"{fmt} {ratio:.2f}x ({fmt_ms(st.p50)} vs {fmt_ms(dt.p50)} ms)"
                    target.measured = measured if target.ok is None else f"{target.measured}; {measured}"
                    target.ok = (ratio <= 1.5) if target.ok is None else (target.ok and ratio <= 1.5)
            self.s2_flatness(fmt, samples)
        if worst_ttfd is not None:
            sizes = ", ".join(f"{n:,}: {'/'.join(v)}" for n, v in ttfd.items())
            self.targets["ttfd"].measured = f"worst {fmt_ms(worst_ttfd)} ms ({sizes} ms, openai/anthropic)"
            self.targets["ttfd"].ok = worst_ttfd < 5.0

    def s2_flatness(self, fmt: str, samples: dict[int, S2Samples]) -> None:
        """Marginal cost per chunk between consecutive sizes: the median over rounds of
        (total(b) - total(a)) / (b - a), both totals from the same round so that drift cancels out.
        Flat means the 1,000 -> 5,000 slope is no steeper than the 50 -> 1,000 one (within 1.5x)."""
        sizes = sorted(samples)
        if len(sizes) < 3:
            return

        def slopes(index: int) -> dict[tuple[int, int], float]:
            out = {}
            for a, b in itertools.pairwise(sizes):
                pairs = zip(samples[b][index], samples[a][index], strict=True)
                out[(a, b)] = percentile([(tb - ta) * 1e6 / (b - a) for tb, ta in pairs], 50)
            return out

        service, direct = slopes(3), slopes(2)

        def cells(values: dict[tuple[int, int], float]) -> str:
            return ", ".join(f"{a:,}->{b:,}: {us:.1f}" for (a, b), us in values.items())

        self.rows.append(
            Row(
                f"2 marginal cost per chunk ({fmt}), us",
                direct=cells(direct),
                service=cells(service),
                note="median over rounds of (total(b) - total(a)) / (b - a), same-round totals",
            )
        )
        self.results[f"s2_{fmt}_marginal_us_per_chunk"] = {
            "service": {f"{a}-{b}": v for (a, b), v in service.items()},
            "direct": {f"{a}-{b}": v for (a, b), v in direct.items()},
        }
        (_, low), (_, high) = list(service.items())[-2:]
        ok = low > 0 and high / low <= 1.5
        verdict = f"{high / low:.2f}x" if low > 0 else "too noisy to tell"
        measured = f"{fmt} {cells(dict(list(service.items())[-2:]))} us ({verdict})"
        target = self.targets["flat"]
        target.measured = measured if target.measured == "-" else f"{target.measured}; {measured}"
        if low > 0:
            target.ok = ok if target.ok is None else (target.ok and ok)

    async def s2_rounds(self, fmt: Format) -> dict[int, S2Samples]:
        """Rounds of every size in turn, each direct then through the service: drift hits all alike."""
        sizes = self.plan.s2_sizes
        samples: dict[int, S2Samples] = {n: ([], [], [], [], []) for n in sizes}
        for round_ in range(self.plan.s2_rounds + 2):  # two warm-up rounds
            for chunks in sizes:
                text = f"chunks={chunks} please"
                d_first, d_total, deltas, _ = await self.direct_stream(
                    fmt, [{"role": "user", "content": text}]
                )
                if deltas != chunks:
                    raise StreamFailed(f"direct: {deltas} deltas, expected {chunks}")
                s_first, s_total, events = await self.service_stream(fmt, text)
                if round_ >= 2:
                    values = (d_first, s_first, d_total, s_total, float(events))
                    for series, value in zip(samples[chunks], values, strict=True):
                        series.append(value)
        return samples

    # --- 3: health under 100 streams ------------------------------------------------------------

    def start_probe(self, path: str, gap: float, count: int = 0) -> subprocess.Popen[bytes]:
        """`bench.probe` in a process of its own: GETs one after the other, `gap` seconds apart, so
        that neither this load generator's event loop nor its GIL is in the latencies measured."""
        assert self.service is not None
        url = self.service.url + path
        return self.procs.spawn(
            [sys.executable, "-m", "bench.probe", url, "--gap", str(gap), "--count", str(count)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    async def finish_probe(self, proc: subprocess.Popen[bytes], stop: bool) -> list[tuple[float, float]]:
        """(sent at, seconds) of each GET, `sent at` on the time.monotonic() clock."""
        out, _ = await asyncio.to_thread(proc.communicate, b"stop\n" if stop else None, 120)
        self.procs.stop(proc)
        samples = [(sent, took) for sent, took, status in json.loads(out) if status == 200]
        if len(samples) != len(json.loads(out)):
            raise RuntimeError("/api/health did not always answer 200")
        return samples

    async def s3_direct(self, text: str) -> dict[str, Any]:
        """The same paced streams read straight from the fake: what the machine does without the service."""
        url, body = self.upstream_request("openai", [{"role": "user", "content": text}])
        marker = b'"delta":{"content":'

        async def stream() -> tuple[float, int]:
            started = time.perf_counter()
            deltas = 0
            tail = b""
            done = False
            async with self.client.stream(
                "POST", url, json=body, headers=self.upstream_headers("openai")
            ) as r:
                async for data in r.aiter_bytes():
                    window = tail + data
                    deltas += window.count(marker) - tail.count(marker)
                    done = done or b"data: [DONE]" in window
                    tail = window[-24:]
            if not done:
                raise StreamFailed("a direct stream ended before [DONE]")
            return time.perf_counter() - started, deltas

        pids = {"upstream": self.upstream_pid, "load generator": os.getpid()}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(stream() for _ in range(self.plan.s3_streams)))
        wall = time.perf_counter() - started
        cpu = ", ".join(f"{n} {100 * (cpu_seconds(p) - before[n]) / wall:.0f}%" for n, p in pids.items())
        return {
            "durations": Stats.of([o[0] for o in outcomes]),
            "rate": sum(o[1] for o in outcomes) / wall,
            "cpu": cpu,
        }

    async def scenario_3(self) -> None:
        await self.main_service()
        await self.attempt("3 health with 100 streams", self.s3)

    async def s3(self) -> None:
        service = await self.main_service()
        plan = self.plan
        await self.finish_probe(self.start_probe("/api/health", 0.005, 20), stop=False)  # warm-up
        idle_samples = await self.finish_probe(
            self.start_probe("/api/health", 0.01, plan.s3_idle_samples), stop=False
        )
        idle = Stats.of([took for _, took in idle_samples])
        rss_before = proc_status(service.pid)
        hwm_reset = reset_peak_rss(service.pid)
        text = f"chunks={plan.s3_chunks} delay=0.02"
        lag: list[float] = []
        peak_rss = [rss_before.get("VmRSS", 0)]
        running = True

        async def monitor() -> None:  # is this load generator keeping up, and the service's RSS
            while running:
                started = time.perf_counter()
                await asyncio.sleep(0.01)
                lag.append(time.perf_counter() - started - 0.01)
                peak_rss.append(proc_status(service.pid).get("VmRSS", 0))

        async def stream() -> tuple[float, int, bool, float, float]:
            """(duration, delta events, complete, first delta at, ended at)"""
            assert self.service is not None
            started = time.perf_counter()
            first = 0.0
            deltas = 0
            tail = b""
            done = False
            body = {"message": text, "model": "openai/" + MODELS["openai"], "stream": True}
            async with self.client.stream("POST", self.service.url + "/api/chat", json=body) as response:
                async for data in response.aiter_bytes():
                    window = tail + data
                    deltas += window.count(b"event: delta\n") - tail.count(b"event: delta\n")
                    if deltas and not first:
                        first = time.monotonic()
                    if b"event: done\n" in window:
                        done = True
                    tail = window[-16:]
            ended = time.monotonic()
            return time.perf_counter() - started, deltas, done, first, ended

        direct = await self.s3_direct(text)
        pids = {"service": service.pid, "upstream": self.upstream_pid, "load generator": os.getpid()}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        monitor_task = asyncio.create_task(monitor())
        probe = self.start_probe("/api/health", 0.01)
        started = time.perf_counter()
        started_at = time.monotonic()
        streams = [asyncio.create_task(stream()) for _ in range(plan.s3_streams)]
        outcomes = await asyncio.gather(*streams, return_exceptions=True)
        wall = time.perf_counter() - started
        cpu = {name: (cpu_seconds(pid) - cpu_before[name]) / wall for name, pid in pids.items()}
        running = False
        ended_at = time.monotonic()
        loaded = [(at, took) for at, took in await self.finish_probe(probe, stop=True) if at >= started_at]
        loaded = [(at, took) for at, took in loaded if at < ended_at]
        await monitor_task
        ok = [o for o in outcomes if isinstance(o, tuple) and o[2]]
        failures = [o for o in outcomes if not (isinstance(o, tuple) and o[2])]
        status = proc_status(service.pid)
        under = Stats.of([took for _, took in loaded])
        # steady state: every stream has sent its first delta and none has finished yet
        steady_from = max((o[3] for o in ok), default=0.0)
        steady_to = min((o[4] for o in ok), default=0.0)
        steady = Stats.of([took for at, took in loaded if steady_from <= at and at + took <= steady_to])
        deltas = sum(o[1] for o in ok)
        durations = Stats.of([o[0] for o in ok]) if ok else None
        lag_p99 = percentile(lag, 99) * 1000
        peak = max(peak_rss) / 1024
        hwm = status.get("VmHWM", 0) / 1024
        note = (
            f"{len(ok)}/{len(outcomes)} streams complete in {wall:.1f} s; "
            f"{deltas / wall:,.0f} delta events/s relayed (ideal {plan.s3_streams * 50:,}); "
            f"stream p50 {durations.p50 / 1000 if durations else float('nan'):.2f} s "
            f"(ideal {plan.s3_chunks * 0.02:.2f}); load generator loop lag p99 {lag_p99:.1f} ms; "
            f"steady state only (all streams started, none finished; {steady.n} samples): "
            f"{steady.cell()} ms"
        )
        self.rows.append(latency_row("3 /api/health: idle -> with 100 streams", idle, under, note))
        cpu_note = ", ".join(f"{name} {100 * share:.0f}%" for name, share in cpu.items())
        if durations is not None:
            self.rows.append(
                latency_row(
                    f"3 {plan.s3_streams} paced streams of {plan.s3_chunks} chunks: stream duration",
                    direct["durations"],
                    durations,
                    f"delta events/s: direct {direct['rate']:,.0f}, service {deltas / wall:,.0f}; "
                    f"CPU (% of one core) direct: {direct['cpu']}; through the service: {cpu_note}",
                )
            )
        self.rows.append(
            Row(
                "3 service RSS (MB): before -> peak with 100 streams",
                direct=f"{rss_before.get('VmRSS', 0) / 1024:.0f}",
                service=f"{peak:.0f}",
                note=f"VmHWM {'since reset' if hwm_reset else 'lifetime'}: {hwm:.0f} MB",
            )
        )
        self.results["s3"] = {
            "idle": asdict(idle),
            "under_load": asdict(under),
            "under_load_steady": asdict(steady),
            "health_samples_ms": [
                [round((at - started_at) * 1000, 1), round(took * 1000, 2)] for at, took in loaded
            ],
            "stream_windows_ms": [
                [round((o[3] - started_at) * 1000), round((o[4] - started_at) * 1000)] for o in ok
            ],
            "cpu_share": cpu,
            "direct_rate": direct["rate"],
            "direct_durations": asdict(direct["durations"]),
            "streams_ok": len(ok),
            "streams": len(outcomes),
            "delta_events_per_s": deltas / wall,
            "rss_before_mb": rss_before.get("VmRSS", 0) / 1024,
            "rss_peak_mb": peak,
            "vmhwm_mb": hwm,
            "loadgen_lag_p99_ms": lag_p99,
        }
        if failures:
            first = failures[0]
            raise StreamFailed(f"{len(failures)} of {len(outcomes)} streams failed (first: {first!r:.150})")
        target = self.targets["health_load"]
        target.measured = f"{fmt_ms(under.p99)} ms (idle {fmt_ms(idle.p99)} ms)"
        target.ok = under.p99 < 20.0

    # --- 4: storage -----------------------------------------------------------------------------

    async def scenario_4(self) -> None:
        await self.attempt("4 append (in-process Store)", self.s4_append)
        await self.main_service()
        await self.attempt("4 open a 1,000-message conversation", self.s4_open)
        await self.attempt("4 API turn, 1,000-message conversation", self.s4_api_turn)
        for count in self.plan.s4_listing:
            await self.attempt(
                f"4 listing, {count:,} conversations", functools.partial(self.s4_listing, count)
            )

    async def s4_append(self) -> None:
        data_dir = self.run_dir / "append-data"
        store = storage.Store(data_dir)
        store.open()
        model = "openai/" + MODELS["openai"]
        make_reply = placeholder_reply(model)
        user_text = text_of(600, self.rng)
        reply_text = text_of(600, self.rng)
        for messages, reps in self.plan.s4_append.items():
            conversation = make_conversation(messages, 600, model, self.rng)
            path = data_dir / "conversations" / f"{conversation['id']}.json"
            original = storage.encode(conversation)
            write_plain(path, original)
            twice: list[float] = []
            appends: list[float] = []
            for i in range(reps + 2):  # two warm-up rounds
                write_plain(path, original)  # the same size every time
                started = time.perf_counter()
                storage.write_durably(path, original)
                storage.write_durably(path, original)
                bare = time.perf_counter() - started
                write_plain(path, original)
                started = time.perf_counter()
                record = await store.append_turn(conversation["id"], user_text, make_reply)
                final: storage.Message = {
                    **record.reply,
                    "content": reply_text,
                    "status": "complete",
                    "finish_reason": "stop",
                    "usage": {"input_tokens": 10, "output_tokens": 100},
                }
                await store.finish_reply(conversation["id"], final)
                took = time.perf_counter() - started
                if i >= 2:
                    twice.append(bare)
                    appends.append(took)
            d, s = Stats.of(twice), Stats.of(appends)
            size = len(original) // 1024
            self.rows.append(
                latency_row(
                    f"4 append turn, {messages:,} messages (in-process)",
                    d,
                    s,
                    f"Store.append_turn + finish_reply; baseline: 2 bare durable writes of {size} KB",
                )
            )
            self.results[f"s4_append_{messages}"] = {"two_writes": asdict(d), "append": asdict(s), "kb": size}
            if messages == 1000:
                target = self.targets["append_1000"]
                target.measured = (
                    f"{fmt_ms(s.p50)} ms (p99 {fmt_ms(s.p99)}; 2 bare writes {fmt_ms(d.p50)} ms)"
                )
                target.ok = s.p50 < 15.0

    def put_conversation(self, data_dir: Path, messages: int) -> storage.Conversation:
        conversation = make_conversation(messages, 600, "openai/" + MODELS["openai"], self.rng)
        folder = data_dir / "conversations"
        folder.mkdir(parents=True, exist_ok=True)
        write_plain(folder / f"{conversation['id']}.json", storage.encode(conversation))
        return conversation

    async def s4_open(self) -> None:
        service = await self.main_service()
        conversation = self.put_conversation(service.data_dir, 1000)
        cid = conversation["id"]
        path = service.data_dir / "conversations" / f"{cid}.json"
        url = f"{service.url}/api/conversations/{cid}"
        direct, through = [], []
        for i in range(self.plan.s4_open_samples + 3):
            started = time.perf_counter()
            storage.parse_conversation(path.read_bytes(), cid)
            parsed = time.perf_counter() - started
            started = time.perf_counter()
            response = await self.client.get(url)
            took = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"GET {url} answered {response.status_code}")
            if i >= 3:
                direct.append(parsed)
                through.append(took)
        d, s = Stats.of(direct), Stats.of(through)
        size = path.stat().st_size // 1024
        self.rows.append(
            latency_row(
                "4 open a 1,000-message conversation",
                d,
                s,
                f"GET /api/conversations/{{id}}, {size} KB file; baseline: read + parse in-process",
            )
        )
        self.results["s4_open_1000"] = {"read_parse": asdict(d), "get": asdict(s), "kb": size}

    async def s4_api_turn(self) -> None:
        service = await self.main_service()
        conversation = self.put_conversation(service.data_dir, 1000)
        cid: str | None = conversation["id"]
        history = [{"role": m["role"], "content": m["content"]} for m in conversation["messages"]]
        direct, through = [], []
        for i in range(self.plan.s4_api_turns + 2):
            text = f"turn {i}: a short question"
            started = time.perf_counter()
            await self.direct_turn("openai", history, text)
            d = time.perf_counter() - started
            started = time.perf_counter()
            cid = await self.service_turn("openai", cid, text)
            s = time.perf_counter() - started
            if i >= 2:
                direct.append(d)
                through.append(s)
        ds, ss = Stats.of(direct), Stats.of(through)
        self.rows.append(
            latency_row(
                "4 API turn, 1,000-message conversation",
                ds,
                ss,
                "POST /api/chat (600 KB history upstream); baseline: the same upstream exchange",
            )
        )
        self.results["s4_api_turn_1000"] = {"direct": asdict(ds), "service": asdict(ss)}

    def listing_dir(self, count: int) -> Path:
        data_dir = self.run_dir / f"listing-{count}"
        if not (data_dir / "conversations").exists():
            prepare_listing_dir(data_dir, count, self.rng)
        return data_dir

    async def s4_listing(self, count: int) -> None:
        data_dir = self.listing_dir(count)
        # The index is built in the background from start-up: "cold" is the first listing, which may
        # still wait for that build.
        service = await self.launch_service(data_dir, ready_path="/docs")
        try:
            url = f"{service.url}/api/conversations?limit=50"
            started = time.perf_counter()
            response = await self.client.get(url)
            cold = time.perf_counter() - started
            if response.status_code != 200 or len(orjson.loads(response.content)["items"]) != min(50, count):
                raise RuntimeError(f"GET {url} answered {response.status_code}: {response.text[:200]}")
            warm = []
            for i in range(self.plan.s4_warm_samples + 5):
                started = time.perf_counter()
                response = await self.client.get(url)
                if i >= 5:
                    warm.append(time.perf_counter() - started)
            rss = proc_status(service.pid).get("VmRSS", 0) / 1024
        finally:
            self.stop_service(service)
        (data_dir / "index.sqlite3").unlink()
        index = search_index.SearchIndex(data_dir)
        started = time.perf_counter()
        index.open()
        index.reconcile()
        build = time.perf_counter() - started
        w = Stats.of(warm)
        self.rows.append(
            Row(
                f"4 listing first page, {count:,} conversations",
                direct=f"build {build * 1000:.0f} ms",
                service=f"cold {cold * 1000:.0f}; warm {w.cell()}",
                note=f"GET /api/conversations?limit=50; baseline: in-process index build; RSS {rss:.0f} MB",
            )
        )
        self.results[f"s4_listing_{count}"] = {
            "cold_ms": cold * 1000,
            "warm": asdict(w),
            "in_process_build_ms": build * 1000,
            "rss_mb": rss,
        }
        if count == 10000:
            target = self.targets["listing"]
            target.measured = f"warm p50 {fmt_ms(w.p50)} ms (p99 {fmt_ms(w.p99)}; cold {cold * 1000:.0f} ms)"
            target.ok = w.p50 < 10.0

    # --- 5: cold start and memory ---------------------------------------------------------------

    async def scenario_5(self) -> None:
        await self.attempt("5 cold start", self.s5_cold_start)
        await self.attempt("5 cold start, 10,000 conversations", self.s5_cold_start_10k)

    async def s5_cold_start(self) -> None:
        times: list[float] = []
        idle_rss: list[float] = []
        idle_hwm: list[float] = []
        after: dict[str, float] = {}
        for i in range(self.plan.s5_launches):
            service = await self.launch_service(self.run_dir / f"cold-{i}")
            try:
                times.append(service.started_in)
                async with httpx2.AsyncClient(trust_env=False) as client:
                    for _ in range(20):
                        await client.get(service.url + "/api/health")
                    await asyncio.sleep(0.5)
                    status = proc_status(service.pid)
                    idle_rss.append(status.get("VmRSS", 0) / 1024)
                    idle_hwm.append(status.get("VmHWM", 0) / 1024)
                    if i == self.plan.s5_launches - 1:  # memory once the SDKs are in use
                        for fmt in ("openai", "anthropic"):
                            response = await client.post(
                                service.url + "/api/chat",
                                json={"message": "hello", "model": f"{fmt}/{MODELS[fmt]}"},
                                timeout=30,
                            )
                            if response.status_code != 200:
                                raise RuntimeError(f"POST /api/chat answered {response.status_code}")
                            after[fmt] = proc_status(service.pid).get("VmRSS", 0) / 1024
            finally:
                self.stop_service(service)
        median = percentile(times, 50)
        rss = percentile(idle_rss, 50)
        hwm = percentile(idle_hwm, 50)
        launches = ", ".join(f"{t * 1000:.0f}" for t in times)
        self.rows.append(
            Row(
                "5 cold start: launch -> first 200 on /api/health (ms)",
                service=f"median {median * 1000:.0f}",
                note=f"{len(times)} launches: {launches}",
            )
        )
        self.rows.append(
            Row(
                "5 RSS idle (MB): VmRSS / VmHWM",
                service=f"{rss:.0f} / {hwm:.0f}",
                note=(
                    f"after the first OpenAI turn {after.get('openai', 0):.0f} MB, "
                    f"then an Anthropic turn {after.get('anthropic', 0):.0f} MB (SDKs imported on first use)"
                ),
            )
        )
        self.results["s5"] = {
            "cold_start_s": times,
            "idle_rss_mb": idle_rss,
            "idle_hwm_mb": idle_hwm,
            "rss_after_turn_mb": after,
        }
        target = self.targets["cold_start"]
        target.measured = f"{median * 1000:.0f} ms"
        target.ok = median < 1.0
        target = self.targets["idle_rss"]
        target.measured = f"{rss:.0f} MB (VmHWM {hwm:.0f} MB)"
        target.ok = rss < 80.0

    async def s5_cold_start_10k(self) -> None:
        count = max(self.plan.s4_listing)
        service = await self.launch_service(self.listing_dir(count))
        self.stop_service(service)
        self.rows.append(
            Row(
                f"5 cold start with {count:,} conversations on disk (ms)",
                service=f"{service.started_in * 1000:.0f}",
                note="the listing index is built in the background at start-up; health does not wait for it",
            )
        )
        self.results["s5_cold_start_10k_s"] = service.started_in

    # --- the whole run --------------------------------------------------------------------------

    async def run(self, scenarios: list[int]) -> None:
        self.start_upstream()
        steps = {
            1: self.scenario_1,
            2: self.scenario_2,
            3: self.scenario_3,
            4: self.scenario_4,
            5: self.scenario_5,
        }
        try:
            for number in scenarios:
                print(f"scenario {number} ...", file=sys.stderr, flush=True)
                started = time.perf_counter()
                if number in (1, 2, 3):
                    await self.attempt(f"{number} start the service", self.main_service)
                self.start_profile(f"s{number}")
                try:
                    await steps[number]()
                except Exception as exc:
                    self.error(f"scenario {number}", exc)
                finally:
                    self.stop_profile()
                print(
                    f"scenario {number}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True
                )
            if self.service is not None:
                self.results["main_service_final"] = proc_status(self.service.pid)
                log_text = self.service.log_path.read_text(errors="replace")
                self.results["service_log_errors"] = log_text.count(" ERROR ")
        finally:
            await self.client.aclose()

    def report(self, info: dict[str, str], scenarios: list[int], elapsed: float) -> str:
        lines = [
            "## Machine",
            "",
            f"- nproc: {info.get('nproc')}; CPU: {info.get('cpu', '?')}; memory: {info.get('memory', '?')}",
            f"- Python {info['python']} on {info['platform']}",
            f"- load average (1/5/15 min) before the run: {info.get('load_before', '?')}, "
            f"after: {info.get('load_after', '?')} (other work on the machine shows up here)",
            f"- {info['date']}; commit {info.get('commit', '?')}; log level {self.args.log_level}; "
            f"{'quick' if self.args.quick else 'default'} run of scenarios "
            f"{', '.join(map(str, scenarios))} in {elapsed:.0f} s",
            "",
            "## Results (ms unless stated; cells are p50 / p99)",
            "",
            markdown_table(
                ["scenario", "direct / baseline", "through the service", "added", "ratio", "notes"],
                [[r.scenario, r.direct, r.service, r.added, r.ratio, r.note] for r in self.rows],
            ),
            "",
            "## Targets",
            "",
            markdown_table(
                ["target", "goal", "measured", "result"],
                [[t.name, t.goal, t.measured, t.verdict] for t in self.targets.values()],
            ),
        ]
        if self.errors:
            lines += ["", "## Errors", ""] + [f"- {e}" for e in self.errors]
        if self.results.get("service_log_errors"):
            lines += [
                "",
                f"The service logged {self.results['service_log_errors']} ERROR lines during the run.",
            ]
        if self.profiles:
            lines += ["", "## Profiles (py-spy; summarise with `python -m bench.profile FILE`)", ""]
            lines += [f"- {name}: {path}" for name, path in self.profiles.items()]
        return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description="Benchmark the chat service against a fake upstream."
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--scenario",
        type=int,
        action="append",
        choices=range(1, 6),
        help="run only this scenario (repeatable)",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="gil",
        choices=("gil", "wall"),
        help="record a py-spy profile of the service per scenario: `gil` (default: only the thread "
        "holding the GIL, i.e. CPU) or `wall` (every thread not idle, including fsync waits)",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument(
        "--service-dir", type=Path, default=ROOT, help="the checkout whose main.py is benchmarked"
    )
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the run's data directories go")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (data and logs)")
    parser.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    return parser.parse_args(argv)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = sorted(set(args.scenario or [1, 2, 3, 4, 5]))
    info = machine_info()
    procs = Processes()
    run_dir = Path(tempfile.mkdtemp(prefix="chat-bench-", dir=args.tmp_dir))
    bench = Bench(args, procs, run_dir)
    started = time.perf_counter()
    print(f"run directory: {run_dir}", file=sys.stderr, flush=True)
    try:
        with terminate_on_sigterm(), asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(bench.run(scenarios))
    except KeyboardInterrupt:
        print("interrupted: stopping the processes", file=sys.stderr)
        return 130
    finally:
        if bench.profiler is not None:
            bench.stop_profile()
        procs.stop_all()
        if args.keep:
            print(f"kept {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    with contextlib.suppress(OSError):
        info["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    text = bench.report(info, scenarios, elapsed)
    print(text)
    if not args.no_json:
        RESULTS_DIR.mkdir(exist_ok=True)
        out = RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
        payload = {
            "machine": info,
            "args": {k: str(v) for k, v in vars(args).items()},
            "elapsed_s": elapsed,
            "rows": [asdict(r) for r in bench.rows],
            "targets": [{**asdict(t), "verdict": t.verdict} for t in bench.targets.values()],
            "results": bench.results,
            "errors": bench.errors,
        }
        out.write_text(json.dumps(payload, indent=2, default=str))
        print(f"\nresults written to {out.relative_to(ROOT)}", file=sys.stderr)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
