"""Benchmarks, run by hand (never by the test suite); results in docs/benchmarks.md."""
