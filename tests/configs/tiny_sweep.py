"""A tiny sweep for end-to-end tests: `cot` and `standard`, each at two learning rates, so with
exact packing there are two packs of two members; with the final evaluation over example counts
and the analyses on."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402


def get_config(arg=None):
    config = tiny.get_config("cot")
    config.seed = 1
    config.train.n_tasks = 8 * 30
    config.eval.eval_every_n_steps = 15
    config.eval.example_counts = "all"
    config.eval.update(dict(analyses=True, analysis_tasks=8, analysis_batch_size=8))
    config.sweep.name = "tiny"
    config.sweep.axes = (("data.prompt_strategy", ("cot", "standard")), ("train.lr", (3e-3, 1e-3)))
    return config
