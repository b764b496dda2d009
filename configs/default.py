"""The reference's defaults (DESIGN.md 1.5): a depth-4, hidden-2048 Llama (245M parameters at
V=1024) on the default task, batch 64 for 50k steps. A GPU/TPU job.

`python -m cotlab_jax.main --config=configs/default.py`
"""

from cotlab_jax import config as config_lib


def get_config(arg=None):
    del arg
    return config_lib.get_base_config()
