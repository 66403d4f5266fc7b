"""Benchmarks against baselines measured in the same run: launch, overhead, data (toolkit.py)."""
