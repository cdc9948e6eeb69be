"""Benchmarks of mplaunch (not tests): run them as ``python -m bench.NAME``."""
