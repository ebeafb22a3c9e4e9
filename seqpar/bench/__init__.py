"""Benchmarks: each prints a table and writes JSON (speed claims come from here, never from tests)."""
