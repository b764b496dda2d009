"""A CPU-sized run: `python -m cotlab_jax.main --config=configs/quickstart.py`."""

from cotlab_jax import config as config_lib


def get_config(arg=None):
    del arg
    return config_lib.get_base_config()
