"""Every test process sees 8 CPU devices, so sharding tests run on any machine, and implicit rank
promotion (a [B] array meeting a [B, L] one) is an error rather than a silent broadcast."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_numpy_rank_promotion", "raise")
