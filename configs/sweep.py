"""The papers' experiments (DESIGN.md 1.6) as sweeps, selected by name:

    python -m cotlab_jax.main --config=configs/sweep.py:vocab --workdir=runs/vocab
    python -m cotlab_jax.main --config=configs/sweep.py:vocab,cpu ...  # CPU-sized models

Each sweep crosses depth {4, 8, 12} with `standard` vs `cot` unless it says otherwise, at the
reference's defaults (a hidden-2048 Llama, batch 64, 50k steps: a GPU/TPU job). The `cpu` scale
keeps the swept values and shrinks the model and the training to laptop size.

A new sweep is a few lines: a `fixed` dict of config fields and an `axes` tuple of
(field, values), e.g.

    SWEEPS["lr"] = dict(fixed={"data.vocab_size": 64},
                        axes=(("train.lr", (1e-4, 3e-4, 1e-3)), ("seed", (0, 1, 2))))
"""

import math

from cotlab_jax import config as config_lib
from cotlab_jax import sweep as sweep_lib

DEPTHS = ("model.num_hidden_layers", (4, 8, 12))
STANDARD_VS_COT = ("data.prompt_strategy", ("standard", "cot"))
PAPER = (DEPTHS, STANDARD_VS_COT)

SWEEPS = {
    "vocab": dict(axes=(*PAPER, ("data.vocab_size", (64, 128, 256, 512, 1024)))),
    "n_dims": dict(fixed={"data.vocab_size": 64},
                   axes=(*PAPER, ("data.n_dims", (20, 30, 40, 50)))),
    "chain_length": dict(axes=(*PAPER, ("data.chain_length_choices", (3, 4, 5)))),
    "parents": dict(fixed={"data.chain_length_choices": (4,), "data.ablation_fixed_H": True,
                           "data.num_unique_H": 100},
                    axes=(*PAPER, ("data.n_parent_choices", (1, 2, 3)))),
    "activation": dict(fixed={"data.vocab_size": 64},
                       axes=(*PAPER, ("data.activation", ("relu", "silu", "identity")))),
    "examples": dict(axes=(*PAPER, ("data.n_example_choices", (10, 20, 30)))),
    # The second paper: hybrid prompts, CoT probability by a power law in alpha.
    "recipe_alpha": dict(
        fixed={"data.prompt_strategy": "hybrid_special_token",
               "data.n_input_choices": (3, 4), "data.n_parent_choices": (3, 4),
               "data.chain_length_choices": (3, 4), "data.n_example_choices": (40,),
               "data.ablation_fixed_H": True, "data.num_unique_H": 1,
               "data.cot_example_prob_recipe_info": dict(
                   type="power_law", initial_prob=0.0, final_prob=1.0, alpha=1.0, scale=1.0),
               "train.n_tasks": 6_400_000, "train.batch_size": 16},
        axes=(DEPTHS, ("data.cot_example_prob_recipe_info.alpha", (0.0, 0.5, 1.0, 2.0, math.inf))),
    ),
}

# Laptop-sized models and training; the swept values stay as the papers ran them.
CPU_SCALE = {
    "model.hidden_size": 64, "model.intermediate_size": 256, "model.num_attention_heads": 4,
    "model.num_key_value_heads": 2, "model.head_dim": 16, "model.dtype": "float32",
    "train.n_tasks": 32 * 1000, "train.batch_size": 32, "train.lr": 1e-3,
    "train.warmup_steps": 100, "train.lr_schedule": "cosine", "train.log_every_n_steps": 50,
    "train.checkpoint_every_n_steps": 250, "eval.n_eval_tasks": 256,
    "eval.eval_every_n_steps": 250, "eval.batch_size": 128,
}
SCALES = {"paper": {}, "cpu": CPU_SCALE}


def _apply(config, fields: dict) -> None:
    for path, value in fields.items():
        sweep_lib.set_field(config, path, value)


def get_config(arg=None):
    name, _, scale = (arg or "").partition(",")
    if name not in SWEEPS:
        raise ValueError(f"configs/sweep.py:{arg}: expected a sweep name, one of {sorted(SWEEPS)}"
                         " (optionally ',cpu')")
    if (scale or "paper") not in SCALES:
        raise ValueError(f"configs/sweep.py:{arg}: expected a scale, one of {sorted(SCALES)}")
    sweep = SWEEPS[name]
    config = config_lib.get_base_config()
    _apply(config, sweep.get("fixed", {}))
    _apply(config, SCALES[scale or "paper"])
    config.eval.example_counts = "all"  # accuracy against the number of examples, at the end
    config.sweep.name = name
    config.sweep.axes = sweep["axes"]
    return config
