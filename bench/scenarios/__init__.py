"""The scenarios, in the order `python -m bench.run` runs them.

To add one: write `bench/scenarios/NAME.py` with a docstring saying what it measures and against
which baseline, an `async def run(bench: Bench) -> None` and `SCENARIO = Scenario(...)` (see
`bench/harness.py` for what `bench` offers, and `large.py` for a short example), then add it below.
"""

from __future__ import annotations

from bench.harness import Scenario
from bench.scenarios import (
    append,
    cold_start,
    health,
    large,
    listing,
    litellm,
    optimisations,
    streaming,
    turns,
)

ALL: list[Scenario] = [
    turns.SCENARIO,
    streaming.SCENARIO,
    health.SCENARIO,
    append.SCENARIO,
    large.SCENARIO,
    listing.SCENARIO,
    cold_start.SCENARIO,
    optimisations.SCENARIO,
    litellm.SCENARIO,
]
