"""Benchmarks: `python -m cotlab_jax.bench <name> [flags]`; each prints a table and writes JSON."""
