"""`python -m cotlab_jax.bench NAME [--flags]`, NAME one of `BENCHMARKS`."""

import importlib
import sys

BENCHMARKS = (
    "all",
    "sampler",
    "model",
    "train",
    "sweep",
    "size_packing",
    "quantize",
    "prune",
    "fidelity",
)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        sys.exit(f"usage: python -m cotlab_jax.bench {{{','.join(BENCHMARKS)}}} [--flags]")
    name = sys.argv.pop(1)
    importlib.import_module(f"cotlab_jax.bench.{name}").main(sys.argv)


if __name__ == "__main__":
    main()
