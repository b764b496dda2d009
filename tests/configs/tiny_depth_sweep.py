"""A tiny depth sweep for the size-packing tests: depth {1, 2} on the tiny `cot` task, 10 steps,
with `sweep.packing="size"` (both members in one size-packed evaluation program)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402


def get_config(arg=None):
    config = tiny.get_config("cot")
    config.train.n_tasks = 8 * 10
    config.eval.eval_every_n_steps = 10
    config.eval.example_counts = "all"
    config.sweep.name = "tiny_depth"
    config.sweep.packing = "size"
    config.sweep.axes = (("model.num_hidden_layers", (1, 2)),)
    return config
