"""Helpers for tests, benchmarks and demos: tiny real models built offline."""
