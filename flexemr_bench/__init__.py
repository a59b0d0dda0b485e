"""Benchmarks: each runs its systems side by side in one run and writes JSON and plots."""
