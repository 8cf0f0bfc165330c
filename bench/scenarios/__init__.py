"""The scenarios, in the order `python -m bench.run` runs them.

To add one: write `bench/scenarios/NAME.py` with a docstring saying what it measures and against
which baseline, an `async def run(bench: Bench) -> None` and `SCENARIO = Scenario(...)` (see
`bench/harness.py` for what `bench` offers, and `large.py` for a short example), then add it below.
The scenarios the next issues need are each such a file, built from pieces already here:

- search at 10,000 conversations: `conversations.fill(dir, 10_000, rng)` and `bench.launch(dir)`
  (as `listing.py` does); direct: the same query over the files in-process.
- import of 1,000 conversations: `conversations.make_conversation` for the file to import; direct:
  writing the same conversations with `storage.write_durably`.
"""

from __future__ import annotations

from bench.harness import Scenario
from bench.scenarios import (
    append,
    before,
    checkpoints,
    cold_start,
    health,
    large,
    listing,
    litellm,
    optimisations,
    page,
    reattach,
    streaming,
    turns,
    v1,
)

ALL: list[Scenario] = [
    turns.SCENARIO,
    before.SCENARIO,
    streaming.SCENARIO,
    health.SCENARIO,
    append.SCENARIO,
    large.SCENARIO,
    listing.SCENARIO,
    cold_start.SCENARIO,
    optimisations.SCENARIO,
    reattach.SCENARIO,
    checkpoints.SCENARIO,
    v1.SCENARIO,
    page.SCENARIO,
    litellm.SCENARIO,
]
