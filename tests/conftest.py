"""Every test process sees 8 CPU devices, so sharding tests run on any machine, and implicit rank
promotion (a [B] array meeting a [B, L] one) is an error rather than a silent broadcast."""

import os

# Subprocesses (the commands under test) run on the CPU too, never loading libtpu: with the test
# extra installed it is present, and only the AOT tests use it (its lockfile admits one process).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_numpy_rank_promotion", "raise")
