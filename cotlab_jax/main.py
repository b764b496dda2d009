"""`python -m cotlab_jax.main --config=configs/<file>.py --workdir=DIR`."""

import sys


def main() -> None:
    sys.exit("cotlab_jax.main: training arrives with the trainer (issue 4); the task sampler is "
             "in cotlab_jax.data and its tests run with the README's test command.")


if __name__ == "__main__":
    main()
