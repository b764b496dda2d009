"""`python -m cotlab_jax.evaluate`: see `cotlab_jax.evaluate.cli`."""

from absl import app

from cotlab_jax.evaluate import cli

if __name__ == "__main__":
    cli.define_flags()
    app.run(cli.main)
