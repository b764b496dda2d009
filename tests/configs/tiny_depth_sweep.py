"""A tiny depth sweep for the size-packing tests: depth {1, 2} x `cot`/`standard`, 10 steps,
trained with `sweep.packing="size"` (so two size-packed evaluation programs, one per task)."""

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
    config.sweep.axes = (
        ("model.num_hidden_layers", (1, 2)),
        ("data.prompt_strategy", ("cot", "standard")),
    )
    return config
