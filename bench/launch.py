"""Run a checkout's `main.py` as `python main.py` would, optionally without one of the optimisations
the first benchmark drove, so that each can be measured against the code as it is:

    python bench/launch.py SERVICE_DIR [--without cache|gc-freeze|first-yield|checkpoints]...
                           [--gc-log FILE]

- `cache`: storage's `RecentConversations` keeps nothing (every change reads and parses the file).
- `gc-freeze`: `gc.freeze()` after start-up does nothing.
- `first-yield`: the `await asyncio.sleep(0)` after a generation's first delta does not yield.
- `checkpoints`: a running reply is never checkpointed to disk (generation.py's checkpoint loop
  returns at once, as it does for a title); only its placeholder and its final save are written.
- `--gc-log FILE`: at exit, write the count and the CPU time of the garbage collections, per
  generation, as JSON (CPU time of the thread, so that other work on the machine is not in it).

A switch whose target is gone from the code (the `core` and `gen` branches rewrite storage.py and
chat.py) makes the launch fail with exit status 3 and a message saying so. Standard library only:
this runs with the service's sys.path, not the benchmark's.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import importlib
import inspect
import json
import runpy
import signal
import sys
import time
import types
from pathlib import Path
from typing import Any


def without_cache() -> None:
    storage = importlib.import_module("storage")
    recent = getattr(storage, "RecentConversations", None)
    if recent is None or not hasattr(recent, "SIZE"):
        raise SystemExit(3)
    recent.SIZE = 0


def without_gc_freeze() -> None:
    gc.freeze = lambda: None


class NoYieldAsyncio(types.ModuleType):
    """asyncio, except that `sleep(0)` returns without giving the loop a turn."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay: float, result: Any = None) -> Any:
        return result if delay == 0 else await asyncio.sleep(delay, result)


def without_first_yield() -> None:
    generation = importlib.import_module("generation")
    if "asyncio.sleep(0)" not in inspect.getsource(generation):
        raise SystemExit(3)
    generation.asyncio = NoYieldAsyncio("asyncio")  # type: ignore[attr-defined]


def without_checkpoints() -> None:
    generation = importlib.import_module("generation")
    cls = getattr(generation, "Generation", None)
    if cls is None or not hasattr(cls, "_checkpoint_loop"):
        raise SystemExit(3)

    async def no_checkpoints(self: Any) -> None:
        return None

    cls._checkpoint_loop = no_checkpoints


SWITCHES = {
    "cache": without_cache,
    "gc-freeze": without_gc_freeze,
    "first-yield": without_first_yield,
    "checkpoints": without_checkpoints,
}


def log_collections(path: Path) -> None:
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:
            pauses[info["generation"]].append(time.thread_time() - started[0])

    def write() -> None:
        summary = {
            f"gen{g}": {"count": len(p), "total_ms": 1000 * sum(p), "max_ms": 1000 * max(p, default=0.0)}
            for g, p in pauses.items()
        }
        path.write_text(json.dumps(summary))

    gc.callbacks.append(callback)
    atexit.register(write)
    # uvicorn re-raises SIGTERM once it has shut down: exit normally then, so that atexit runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/launch.py")
    parser.add_argument("service_dir", type=Path)
    parser.add_argument("--without", action="append", default=[], choices=sorted(SWITCHES))
    parser.add_argument("--gc-log", type=Path)
    args = parser.parse_args()
    main_py = args.service_dir.resolve() / "main.py"
    sys.path[0] = str(main_py.parent)  # as for `python main.py`
    sys.argv = [str(main_py)]
    for name in args.without:
        try:
            SWITCHES[name]()
        except SystemExit:
            print(f"--without {name}: that optimisation is not in this code", file=sys.stderr)
            raise
    if args.gc_log:
        log_collections(args.gc_log)
    runpy.run_path(str(main_py), run_name="__main__")


if __name__ == "__main__":
    main()
