"""The papers' experiments: one named sweep per card of the reference's `core/task_card.py`.

    python -m cotlab_jax.main --config=configs/sweep.py:vocab --workdir=runs/vocab
    python -m cotlab_jax.main --config=configs/sweep.py:vocab,cpu ...  # CPU-sized models
    python -m cotlab_jax.main --config=configs/sweep.py ...            # the headline: `vocab`

| name                         | reference card                | members                          |
|------------------------------|-------------------------------|----------------------------------|
| `default`                    | `default_task_card`           | `Args()`                         |
| `vocab`                      | `vary_vocab_size`             | L x {standard, cot} x V          |
| `n_dims`                     | `vary_n_dims`                 | L x {standard, cot} x d, V=64    |
| `chain_length`               | `vary_chain_length`           | L x {standard, cot} x C, batch 32|
| `parents`                    | `vary_n_parents`              | L x {standard, cot} x M, C=4     |
| `activation`                 | `vary_data_activation`        | L x {standard, cot} x act, V=64  |
| `examples`                   | `vary_num_examples`           | L x {standard, cot} x K          |
| `hybrid_sanity`              | `hybrid_sanity_check`         | one 40-step hybrid run           |
| `fixed_chain_length`         | `baseline_fixed_chain_length` | L, hybrid, C=5, batch 32         |
| `probabilistic_chain_length` | `probabilistic_chain_length`  | L, hybrid, C in {2,3,4}, batch 32|
| `recipe_alpha`               | `hybrid_power_law_alpha`      | L x alpha, hybrid, batch 16      |

L is depth {4, 8, 12}. Members are the card's, in the card's order (member i is the card's key
i), field for field: every field a card does not set keeps the reference's `Args()` default (so
C=2 unless a card says otherwise), and the batch, `n_tasks`, learning rate, eval and checkpoint
cadence and recipe are the card's. docs/tasks.md describes each.

Batch: a card's `batch_size` is per DDP rank in the reference, so a card launched there on W GPUs
trains on a global batch of batch_size x W for n_tasks / (batch_size x W) steps. These sweeps
reproduce W=1 (global batch 64; 32 for the chain-length and hybrid baseline cards; 16 for
`recipe_alpha`); `--config.train.reference_world_size=W` reproduces a W-GPU run (the global batch
scales, `n_tasks` stays).

Three cards cannot run in the reference as written; these sweeps run the nearest runnable thing:
- `vary_vocab_size` sets `enable_special_tokens=True` with `standard`/`cot` prompts, whose prompt
  classes assert that special tokens are off. `vocab` runs the card without special tokens (the
  first paper's setting: plain prompts over the whole vocabulary).
- `baseline_fixed_chain_length` and `probabilistic_chain_length` use `hybrid_special_token`
  without a `cot_example_prob_recipe_info`, so the reference's sampler never draws a CoT
  probability and the hybrid prompt fails on the missing `cot_example_prob`. These sweeps run the
  strategy's documented "uniform choice" between the CoT and the direct form: p = 0.5 for every
  example, written as a power law with alpha 0 and scale 0.5 (p = min(0.5 * x^0 + 0, 1)).

With no name the headline runs: `vocab`, the first paper's main comparison. Its claim is that CoT
moves the accuracy transition earlier at every model size; `vocab` crosses all three depths with
standard vs CoT prompts over five vocabularies (the default V=1024 among them), so it carries that
comparison over the widest range of task difficulty the paper reports.

The `cpu` scale keeps every card's task and swept values and shrinks the model (hidden 64) and
the training (1,000 steps of 32, or the card's own length if shorter) to laptop size.

A new sweep is a few lines: `fixed` config fields, an optional `per_device_batch`, and `axes`
(field, values), first axis slowest, e.g.

    SWEEPS["lr"] = dict(card=None, fixed={"data.vocab_size": 64},
                        axes=(("train.lr", (1e-4, 3e-4, 1e-3)), ("seed", (0, 1, 2))))
"""

import itertools
import math

import ml_collections

from cotlab_jax import config as config_lib
from cotlab_jax import data, model
from cotlab_jax import sweep as sweep_lib

DEPTHS = ("model.num_hidden_layers", (4, 8, 12))
STANDARD_VS_COT = ("data.prompt_strategy", ("standard", "cot"))
PAPER = (DEPTHS, STANDARD_VS_COT)


def _recipe(alpha, scale=1.0):
    return dict(type="power_law", initial_prob=0.0, final_prob=1.0, alpha=alpha, scale=scale)


HYBRID = {"data.prompt_strategy": "hybrid_special_token"}
ONE_PROCESSOR = {"data.ablation_fixed_H": True, "data.num_unique_H": 1}
# What the reference's hybrid cards without a recipe stand for (see the module docstring).
UNIFORM_CHOICE = {"data.cot_example_prob_recipe_info": _recipe(alpha=0, scale=0.5)}
EVERY_1000 = {"eval.eval_every_n_steps": 1000, "train.checkpoint_every_n_steps": 1000}

SWEEPS = {
    "default": dict(card="default_task_card", axes=(("data.prompt_strategy", ("standard",)),)),
    "vocab": dict(
        card="vary_vocab_size", axes=(*PAPER, ("data.vocab_size", (64, 128, 256, 512, 1024)))
    ),
    "n_dims": dict(
        card="vary_n_dims",
        fixed={"data.vocab_size": 64},
        axes=(*PAPER, ("data.n_dims", (20, 30, 40, 50))),
    ),
    "chain_length": dict(
        card="vary_chain_length",
        fixed=EVERY_1000,
        per_device_batch=32,
        axes=(*PAPER, ("data.chain_length_choices", (3, 4, 5))),
    ),
    "parents": dict(
        card="vary_n_parents",
        fixed={
            "data.chain_length_choices": (4,),
            "data.ablation_fixed_H": True,
            "data.num_unique_H": 100,
        },
        axes=(*PAPER, ("data.n_parent_choices", (1, 2, 3))),
    ),
    "activation": dict(
        card="vary_data_activation",
        fixed={"data.vocab_size": 64},
        axes=(*PAPER, ("data.activation", ("relu", "silu", "identity"))),
    ),
    "examples": dict(
        card="vary_num_examples", axes=(*PAPER, ("data.n_example_choices", (10, 20, 30)))
    ),
    # The second paper's cards (special tokens).
    "hybrid_sanity": dict(
        card="hybrid_sanity_check",
        per_device_batch=32,
        fixed={
            **HYBRID,
            **ONE_PROCESSOR,
            "data.cot_example_prob_recipe_info": _recipe(alpha=2),
            "train.n_tasks": 4 * 32 * 10,
            "eval.n_eval_tasks": 10,
            "eval.eval_every_n_steps": 10,
            "train.checkpoint_every_n_steps": 10,
        },
        axes=(("model.num_hidden_layers", (4,)),),
    ),
    "fixed_chain_length": dict(
        card="baseline_fixed_chain_length",
        per_device_batch=32,
        fixed={**HYBRID, **UNIFORM_CHOICE, **EVERY_1000, "data.chain_length_choices": (5,)},
        axes=(DEPTHS,),
    ),
    "probabilistic_chain_length": dict(
        card="probabilistic_chain_length",
        per_device_batch=32,
        fixed={
            **HYBRID,
            **UNIFORM_CHOICE,
            **EVERY_1000,
            **ONE_PROCESSOR,
            "data.chain_length_choices": (2, 3, 4),
        },
        axes=(DEPTHS,),
    ),
    "recipe_alpha": dict(
        card="hybrid_power_law_alpha",
        per_device_batch=16,
        fixed={
            **HYBRID,
            **ONE_PROCESSOR,
            "data.cot_example_prob_recipe_info": _recipe(alpha=1.0),
            "data.n_input_choices": (3, 4),
            "data.n_parent_choices": (3, 4),
            "data.chain_length_choices": (3, 4),
            "train.n_tasks": 64 * 50_000 * 2,
            "eval.eval_every_n_steps": 4000,
            "train.checkpoint_every_n_steps": 4000,
        },
        axes=(DEPTHS, ("data.cot_example_prob_recipe_info.alpha", (0, 0.5, 1, 2, math.inf))),
    ),
}
HEADLINE = "vocab"

# Laptop-sized models and training; the cards' tasks and swept values stay.
CPU_SCALE = {
    "model.hidden_size": 64,
    "model.intermediate_size": 256,
    "model.num_attention_heads": 4,
    "model.num_key_value_heads": 2,
    "model.head_dim": 16,
    "train.lr": 1e-3,
    "train.warmup_steps": 100,
    "train.lr_schedule": "cosine",
    "train.log_every_n_steps": 50,
    "train.checkpoint_every_n_steps": 250,
    "eval.eval_every_n_steps": 250,
    "eval.batch_size": 128,
}
CPU_PER_DEVICE_BATCH = 32
# Upper bounds at the cpu scale (a card's shorter run stays as it is).
CPU_CAPS = {"train.n_tasks": 32 * 1000, "eval.n_eval_tasks": 256}
SCALES = ("paper", "cpu")
# For the printed estimate: sustained training throughput, FLOP/s, by scale and compute dtype.
# Paper scale: one H100 at about 40% of its dense peak (true float32, as the reference: 67
# TFLOP/s; bfloat16: 989); cpu scale: the quickstart's whole-run rate on this lab's 2-core CPU
# (6.7 TFLOP of training in 6 min 11 s, float32).
ASSUMED_FLOPS = {
    "paper": {
        "float32": (2.7e13, "one H100 in float32 (~40% of its peak)"),
        "bfloat16": (4e14, "one H100 in bfloat16 (~40% MFU)"),
    },
    "cpu": {"float32": (2e10, "a 2-core CPU"), "bfloat16": (2e10, "a 2-core CPU")},
}


def _apply(config, fields: dict) -> None:
    for path, value in fields.items():
        sweep_lib.set_field(config, path, value)


def _usage(arg) -> str:
    return (
        f"configs/sweep.py:{arg}: expected a sweep name, one of {', '.join(SWEEPS)} (none: "
        f"the headline {HEADLINE}), optionally followed by a scale, one of "
        f"{', '.join(',' + s for s in SCALES)}"
    )


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    if hours >= 10:
        return f"{hours:,.0f} h"
    return f"{hours:.2g} h" if hours >= 1 else f"{seconds / 60:.2g} min"


def get_config(arg=None):
    name, _, scale = (arg or "").partition(",")
    if name and name not in SWEEPS or (scale or "paper") not in SCALES:
        raise ValueError(_usage(arg))
    headline = not name
    name, scale = name or HEADLINE, scale or "paper"
    sweep = SWEEPS[name]
    config = config_lib.get_base_config()
    _apply(config, sweep.get("fixed", {}))
    config_lib.set_per_device_batch(
        config.train, sweep.get("per_device_batch", config_lib.REFERENCE_BATCH_SIZE)
    )
    if scale == "cpu":
        _apply(config, CPU_SCALE)
        config_lib.set_per_device_batch(config.train, CPU_PER_DEVICE_BATCH)
        _apply(
            config,
            {path: min(sweep_lib.get_field(config, path), cap) for path, cap in CPU_CAPS.items()},
        )
    config.eval.example_counts = "all"  # accuracy against the number of examples, at the end
    config.sweep.name = name
    config.sweep.axes = sweep["axes"]
    if headline:
        print(f"configs/sweep.py: no sweep named, so the headline: {describe(config, scale)}")
    return config


def describe(config, scale: str) -> str:
    """What the sweep runs, at what scale, and roughly how long (training FLOPs at an assumed
    throughput; evaluation not counted)."""
    axes = config.sweep.axes
    flops, steps, batches = 0.0, set(), set()
    for combo in itertools.product(*(values for _, values in axes)):
        member = ml_collections.ConfigDict(config.to_dict())
        _apply(
            member,
            {
                path: (value,) if path.endswith("_choices") else value
                for (path, _), value in zip(axes, combo, strict=True)
            },
        )
        seq_len = data.TaskSpec.from_config(member).seq_len
        llama = model.LlamaConfig.from_config(member.model, member.data.vocab_size)
        member_steps = member.train.n_tasks // member.train.batch_size
        flops += (
            model.flops_per_token(llama, seq_len) * seq_len * member.train.batch_size * member_steps
        )
        steps.add(member_steps)
        batches.add(member.train.batch_size)
    rate, device = ASSUMED_FLOPS[scale][config.model.dtype]
    n_members = math.prod(len(values) for _, values in axes)
    swept = " x ".join(f"{path.split('.')[-1]} {tuple(values)}" for path, values in axes)
    return (
        f"`{config.sweep.name}` (the reference's {SWEEPS[config.sweep.name]['card']}) at the "
        f"{scale} scale: {n_members} member(s) "
        f"({swept}), {sorted(steps)} steps of global batch {sorted(batches)}; about "
        f"{flops / 1e15:.3g} PFLOP of training, ~{_duration(flops / rate)} on {device}. "
        f"Other sweeps: {', '.join(SWEEPS)}."
    )
