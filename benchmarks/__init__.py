"""Reproductions of the papers' tables and performance benchmarks: ``python -m benchmarks --help``."""
