"""Benchmarks: each runnable as ``python -m bench.NAME`` or ``pgsynapse bench NAME`` (see BENCHMARKS.md)."""
