"""Probe one URL with sequential GETs from a process of its own: `python -m bench.probe URL`.

The benchmark runs this beside its load generator so that the probe's latencies do not include
the load generator's own event-loop delays or GIL. It sends a GET, waits `--gap` seconds, and so
on, until `--count` answers or (without `--count`) until a line or EOF arrives on stdin; then it
prints a JSON list of `[sent_at, seconds, status]`, `sent_at` being `time.monotonic()` (the same
clock in every process of the machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import httpx2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.probe")
    parser.add_argument("url")
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between requests")
    parser.add_argument("--count", type=int, default=0, help="stop after this many (0: at stdin)")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def wait_for_stdin() -> None:
        sys.stdin.readline()
        stop.set()

    if args.count == 0:
        threading.Thread(target=wait_for_stdin, daemon=True).start()
    samples: list[tuple[float, float, int]] = []
    with httpx2.Client(timeout=httpx2.Timeout(30.0), trust_env=False) as client:
        while not stop.is_set() and (args.count == 0 or len(samples) < args.count):
            sent = time.monotonic()
            started = time.perf_counter()
            status = client.get(args.url).status_code
            samples.append((sent, time.perf_counter() - started, status))
            time.sleep(args.gap)
    json.dump(samples, sys.stdout)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
