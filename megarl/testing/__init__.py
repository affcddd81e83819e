"""Helpers for tests and benchmarks (gloo worlds, tiny models)."""
