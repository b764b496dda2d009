"""Every test process sees 8 CPU devices, so sharding tests run on any machine."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
