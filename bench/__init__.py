"""Benchmarks of the chat service: `python -m bench.run` (see BENCHMARKS.md)."""
