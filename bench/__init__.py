"""Benchmarks of sortpool_ref: python -m bench --help."""
