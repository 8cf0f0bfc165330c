"""Summarise a py-spy `--format raw` profile: where the service's CPU time goes.

    py-spy record --pid PID --rate 250 --format raw --full-filenames --gil -o bench/results/p.txt
    .venv/bin/python -m bench.profile bench/results/p.txt [--top 15]

(PID: a service the benchmark started, e.g. with `python -m bench.run --keep turns`; `pip install
py-spy` first. Without `--gil`, every thread that is not idle is sampled, fsync waits included.)

Each line of a raw profile is `frame;frame;...;frame COUNT`, outermost frame first, a frame being
`function (file:line)`. Printed: the share of samples per leaf function ("self"), per function
anywhere on the stack ("total", counted once per sample) for the project's own files, and per
package of the leaf frame.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
PROJECT_FILES = ("main.py", "chat.py", "providers.py", "storage.py")


@dataclass
class Summary:
    samples: int
    self_by_function: Counter[str]
    total_by_project_function: Counter[str]
    self_by_package: Counter[str]


def short_file(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    if "/lib/python3" in path:
        return "stdlib/" + path.rsplit("/", 1)[-1]
    return path.rsplit("/", 1)[-1]


def package_of(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/lib/python3" in path:
        name = path.split("/lib/python3", 1)[1].split("/", 2)
        return "stdlib/" + (name[1] if len(name) > 2 else name[-1])
    return short_file(path)


def parse_frame(frame: str) -> tuple[str, str]:
    """(function, file) of one frame; the line number is dropped so a function is one entry."""
    match = FRAME_RE.match(frame)
    if match is None:
        return frame, ""
    return match.group("func"), match.group("file")


def summarise(text: str) -> Summary:
    self_by_function: Counter[str] = Counter()
    total: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [parse_frame(f) for f in stack.split(";")]
        func, file = frames[-1]
        self_by_function[f"{func} ({short_file(file)})"] += count
        by_package[package_of(file)] += count
        seen = set()
        for func, file in frames:
            name = short_file(file)
            if name in PROJECT_FILES:
                key = f"{func} ({name})"
                if key not in seen:
                    seen.add(key)
                    total[key] += count
    return Summary(samples, self_by_function, total, by_package)


def report(summary: Summary, top: int = 15) -> str:
    if not summary.samples:
        return "no samples"
    lines = [f"{summary.samples} samples"]

    def block(title: str, counter: Counter[str]) -> None:
        lines.append(title)
        for name, count in counter.most_common(top):
            lines.append(f"  {100 * count / summary.samples:5.1f}%  {name}")

    block("self time by function (leaf frame):", summary.self_by_function)
    block("self time by package:", summary.self_by_package)
    block("total time in the project's functions (on the stack):", summary.total_by_project_function)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(report(summarise(args.profile.read_text()), args.top))


if __name__ == "__main__":
    main()
