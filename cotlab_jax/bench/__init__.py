"""Benchmarks: `python -m cotlab_jax.bench <name> [flags]`; each prints a table and writes JSON."""

import argparse


def positive_int(text: str) -> int:
    """argparse type for a count that must be at least 1: a bad value ends in argparse's one
    usage error instead of an empty or divided-by-zero table."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value
