"""cotlab_jax: chain-of-thought in-context learning with synthetic tasks, in JAX."""

import jax

# Sharded random draws are then cheap and identical on any device count (data is a function of
# (seed, step), whatever the mesh).
jax.config.update("jax_threefry_partitionable", True)

__version__ = "0.1.0"
