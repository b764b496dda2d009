"""Every shipped config validates; the defaults, every named sweep and the run names are the
reference's (kvignesh1420/cot-icl-lab, src/tokenized_cot_icl/core/), checked against a
transcription of its `Args`, `task_card.py` and `Args.__str__` written out below (not read from
configs/); the quickstart stays CPU-sized; and a config file that fails to load, or an override
of a swept field, ends the main command in one line."""

import glob
import importlib.util
import itertools
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cotlab_jax import config as config_lib
from cotlab_jax import data, experiment, model, sweep

ROOT = os.path.join(os.path.dirname(__file__), "..")
# configs/sweep.py takes a sweep's name; the tests below expand every one.
CONFIGS = sorted(
    path
    for path in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if os.path.basename(path) != "sweep.py"
)


def load_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path):
    return load_module(path).get_config()


SWEEP_CONFIGS = load_module(os.path.join(ROOT, "configs", "sweep.py"))

# ---- The reference, transcribed ----------------------------------------------------------------

# core/args.py: `Args()`'s defaults.
REFERENCE_ARGS = dict(
    seed=42,
    n_input_choices=(4,),
    n_parent_choices=(4,),
    chain_length_choices=(2,),
    n_example_choices=(40,),
    vocab_size=1024,
    n_dims=10,
    n_tasks=64 * 50 * 1000,
    batch_size=64,
    data_initializer_range=1,
    dag_strategy="random",
    ablation_fixed_dag=False,
    activation="leaky_relu",
    H_num_layers=1,
    ablation_fixed_H=False,
    num_unique_H=None,
    model_type="llama",
    num_attention_heads=32,
    num_hidden_layers=4,
    num_key_value_heads=8,
    hidden_size=2048,
    intermediate_size=8192,
    rope_scaling={
        "factor": 1.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1000,
        "rope_type": "llama3",
    },
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    lr=5e-5,
    num_epochs=1,
    output_base_dir="/opt/cot-icl-lab",
    log_every_n_steps=100,
    checkpoint_every_n_steps=500,
    prompt_strategy="standard",
    cot_example_prob_recipe_info={},
    temperature=0.0,
    eval_every_n_steps=500,
    n_eval_tasks=10000,
    enable_special_tokens=False,
    max_pred_tokens=100,
    metric_logger="stdout",
)
# `Args` fields with no counterpart here: the model family is always Llama, positions are
# computed (no table), one pass over `n_tasks`, and paths, logging and the (unused in training)
# sampling temperature are the run tools' business.
UNMAPPED = {
    "model_type",
    "max_position_embeddings",
    "num_epochs",
    "output_base_dir",
    "metric_logger",
    "temperature",
}
# What the reference takes from library defaults: core/train.py builds
# `torch.optim.AdamW(model.parameters(), lr=args.lr)` (no schedule, no clipping) and
# core/models.py a `transformers.LlamaConfig` that leaves these at their defaults.
REFERENCE_CONSTANTS = {
    "train.b1": 0.9,
    "train.b2": 0.999,
    "train.eps": 1e-8,
    "train.weight_decay": 0.01,
    "train.warmup_steps": 0,
    "train.lr_schedule": "constant",
    "train.grad_clip_norm": 0.0,
    "model.rms_norm_eps": 1e-6,
    "model.initializer_range": 0.02,
}
DEPTHS = (4, 8, 12)
PROMPTS = ("standard", "cot")


def _power_law(alpha):
    return {
        "type": "power_law",
        "initial_prob": 0.0,
        "final_prob": 1.0,
        "alpha": alpha,
        "scale": 1.0,
    }


# core/task_card.py: each card's members in key order, as the `Args(...)` overrides it writes.
REFERENCE_CARDS = {
    "default_task_card": [{}],
    "vary_vocab_size": [
        dict(vocab_size=v, num_hidden_layers=layers, prompt_strategy=p, enable_special_tokens=True)
        for layers, p, v in itertools.product(DEPTHS, PROMPTS, (64, 128, 256, 512, 1024))
    ],
    "vary_n_dims": [
        dict(vocab_size=64, n_dims=d, num_hidden_layers=layers, prompt_strategy=p)
        for layers, p, d in itertools.product(DEPTHS, PROMPTS, (20, 30, 40, 50))
    ],
    "vary_chain_length": [
        dict(
            vocab_size=1024,
            chain_length_choices=(c,),
            num_hidden_layers=layers,
            prompt_strategy=p,
            batch_size=32,
            checkpoint_every_n_steps=1000,
            eval_every_n_steps=1000,
        )
        for layers, p, c in itertools.product(DEPTHS, PROMPTS, (3, 4, 5))
    ],
    "vary_n_parents": [
        dict(
            vocab_size=1024,
            n_parent_choices=(m,),
            chain_length_choices=(4,),
            num_hidden_layers=layers,
            prompt_strategy=p,
            ablation_fixed_H=True,
            num_unique_H=100,
        )
        for layers, p, m in itertools.product(DEPTHS, PROMPTS, (1, 2, 3))
    ],
    "vary_data_activation": [
        dict(vocab_size=64, activation=act, num_hidden_layers=layers, prompt_strategy=p)
        for layers, p, act in itertools.product(DEPTHS, PROMPTS, ("relu", "silu", "identity"))
    ],
    "vary_num_examples": [
        dict(vocab_size=1024, n_example_choices=(k,), num_hidden_layers=layers, prompt_strategy=p)
        for layers, p, k in itertools.product(DEPTHS, PROMPTS, (10, 20, 30))
    ],
    "hybrid_sanity_check": [
        dict(
            vocab_size=1024,
            num_hidden_layers=4,
            prompt_strategy="hybrid_special_token",
            n_tasks=4 * 32 * 10,
            n_eval_tasks=10,
            batch_size=32,
            checkpoint_every_n_steps=10,
            eval_every_n_steps=10,
            enable_special_tokens=True,
            ablation_fixed_H=True,
            num_unique_H=1,
            cot_example_prob_recipe_info=_power_law(2),
        )
    ],
    "baseline_fixed_chain_length": [
        dict(
            vocab_size=1024,
            chain_length_choices=(5,),
            num_hidden_layers=layers,
            prompt_strategy="hybrid_special_token",
            batch_size=32,
            checkpoint_every_n_steps=1000,
            eval_every_n_steps=1000,
            enable_special_tokens=True,
        )
        for layers in DEPTHS
    ],
    "probabilistic_chain_length": [
        dict(
            vocab_size=1024,
            chain_length_choices=(2, 3, 4),
            num_hidden_layers=layers,
            prompt_strategy="hybrid_special_token",
            batch_size=32,
            checkpoint_every_n_steps=1000,
            eval_every_n_steps=1000,
            enable_special_tokens=True,
            ablation_fixed_H=True,
            num_unique_H=1,
        )
        for layers in DEPTHS
    ],
    "hybrid_power_law_alpha": [
        dict(
            vocab_size=1024,
            n_input_choices=(3, 4),
            n_parent_choices=(3, 4),
            chain_length_choices=(3, 4),
            num_hidden_layers=layers,
            prompt_strategy="hybrid_special_token",
            n_tasks=64 * 50 * 1000 * 2,
            n_eval_tasks=10000,
            batch_size=16,
            lr=5e-5,
            checkpoint_every_n_steps=4000,
            eval_every_n_steps=4000,
            enable_special_tokens=True,
            ablation_fixed_H=True,
            num_unique_H=1,
            cot_example_prob_recipe_info=_power_law(alpha),
        )
        for layers, alpha in itertools.product(DEPTHS, (0, 0.5, 1, 2, math.inf))
    ],
}
# Cards the reference cannot run as written, and what runs instead: `standard`/`cot` prompts
# assert that special tokens are off; a hybrid card without a recipe never draws the CoT
# probability its prompt needs, so the strategy's "uniform choice" (p = 0.5) runs.
RUNNABLE_INSTEAD = {
    "vary_vocab_size": dict(enable_special_tokens=False),
    "baseline_fixed_chain_length": dict(
        cot_example_prob_recipe_info={**_power_law(0), "scale": 0.5}
    ),
    "probabilistic_chain_length": dict(
        cot_example_prob_recipe_info={**_power_law(0), "scale": 0.5}
    ),
}
SWEEP_CARDS = {
    "default": "default_task_card",
    "vocab": "vary_vocab_size",
    "n_dims": "vary_n_dims",
    "chain_length": "vary_chain_length",
    "parents": "vary_n_parents",
    "activation": "vary_data_activation",
    "examples": "vary_num_examples",
    "hybrid_sanity": "hybrid_sanity_check",
    "fixed_chain_length": "baseline_fixed_chain_length",
    "probabilistic_chain_length": "probabilistic_chain_length",
    "recipe_alpha": "hybrid_power_law_alpha",
}


def reference_args(card: str, index: int) -> dict:
    return {**REFERENCE_ARGS, **REFERENCE_CARDS[card][index], **RUNNABLE_INSTEAD.get(card, {})}


def reference_str(args: dict) -> str:
    """`Args.__str__` (core/args.py), transcribed."""
    recipe_str = "none"
    if args["cot_example_prob_recipe_info"]:
        info = args["cot_example_prob_recipe_info"]
        recipe_str = f"type_{info.get('type', 'unknown')}_alpha_{info.get('alpha', 'unknown')}"
    return "_".join(
        [
            args["model_type"],
            f"L_{args['num_hidden_layers']}",
            f"V_{args['vocab_size']}",
            f"heads_{args['num_attention_heads']}",
            f"M_{'-'.join(str(i) for i in args['n_parent_choices'])}",
            f"N_{'-'.join(str(i) for i in args['n_input_choices'])}",
            f"C_{'-'.join(str(i) for i in args['chain_length_choices'])}",
            f"n_ex_{'-'.join(str(i) for i in args['n_example_choices'])}",
            f"n_dims_{args['n_dims']}",
            f"hs_{args['hidden_size']}",
            f"bs_{args['batch_size']}",
            f"act_{args['activation']}",
            f"prompt_{args['prompt_strategy']}",
            f"recipe_{recipe_str}",
        ]
    )


# ---- This lab's config, read in the reference's terms -------------------------------------------


def as_reference_args(config) -> dict:
    d, m, t, e = config.data, config.model, config.train, config.eval
    recipe = d.cot_example_prob_recipe_info
    return dict(
        seed=config.seed,
        n_input_choices=tuple(d.n_input_choices),
        n_parent_choices=tuple(d.n_parent_choices),
        chain_length_choices=tuple(d.chain_length_choices),
        n_example_choices=tuple(d.n_example_choices),
        vocab_size=d.vocab_size,
        n_dims=d.n_dims,
        n_tasks=t.n_tasks,
        batch_size=t.batch_size // t.reference_world_size,
        data_initializer_range=d.data_initializer_range,
        dag_strategy=d.dag_strategy,
        ablation_fixed_dag=d.ablation_fixed_dag,
        activation=d.activation,
        H_num_layers=d.H_num_layers,
        ablation_fixed_H=d.ablation_fixed_H,
        num_unique_H=None if d.num_unique_H == -1 else d.num_unique_H,
        num_attention_heads=m.num_attention_heads,
        num_hidden_layers=m.num_hidden_layers,
        num_key_value_heads=m.num_key_value_heads,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        rope_scaling=dict(m.rope_scaling),
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings,
        lr=t.lr,
        log_every_n_steps=t.log_every_n_steps,
        checkpoint_every_n_steps=t.checkpoint_every_n_steps,
        prompt_strategy=d.prompt_strategy,
        cot_example_prob_recipe_info={} if recipe is None else dict(recipe),
        eval_every_n_steps=e.eval_every_n_steps,
        n_eval_tasks=e.n_eval_tasks,
        enable_special_tokens=config_lib.uses_special_tokens(d.prompt_strategy),
        max_pred_tokens=e.max_pred_tokens,
    )


def assert_is_reference(config, expected: dict, fields=None):
    got = as_reference_args(config)
    fields = sorted(fields or got)
    assert {f: got[f] for f in fields} == {f: expected[f] for f in fields}
    for path, value in REFERENCE_CONSTANTS.items():
        assert sweep.get_field(config, path) == value, path
    # transformers' LlamaConfig: head_dim = hidden_size // num_attention_heads.
    assert config.model.head_dim == config.model.hidden_size // config.model.num_attention_heads


def test_every_reference_field_is_compared():
    assert set(REFERENCE_ARGS) - set(as_reference_args(config_lib.get_base_config())) == UNMAPPED


def test_base_config_and_default_py_are_the_reference_args():
    assert_is_reference(config_lib.get_base_config(), REFERENCE_ARGS)
    assert_is_reference(load(os.path.join(ROOT, "configs", "default.py")), REFERENCE_ARGS)


def test_sweeps_cover_every_card():
    assert set(SWEEP_CONFIGS.SWEEPS) == set(SWEEP_CARDS)
    assert set(SWEEP_CARDS.values()) == set(REFERENCE_CARDS)
    assert {name: s["card"] for name, s in SWEEP_CONFIGS.SWEEPS.items()} == SWEEP_CARDS


@pytest.mark.parametrize("name", sorted(SWEEP_CARDS))
def test_sweep_members_are_the_cards_members(name):
    card = SWEEP_CARDS[name]
    members = sweep.expand(SWEEP_CONFIGS.get_config(name))
    assert len(members) == len(REFERENCE_CARDS[card])
    for member in members:
        assert_is_reference(member.config, reference_args(card, member.index))
        assert member.config.train.reference_world_size == 1
        assert member.name.startswith(reference_str(reference_args(card, member.index)) + "_")


# The task (and depth) a `cpu` member keeps from its card.
TASK_FIELDS = (
    "seed",
    "n_input_choices",
    "n_parent_choices",
    "chain_length_choices",
    "n_example_choices",
    "vocab_size",
    "n_dims",
    "data_initializer_range",
    "dag_strategy",
    "ablation_fixed_dag",
    "activation",
    "H_num_layers",
    "ablation_fixed_H",
    "num_unique_H",
    "prompt_strategy",
    "cot_example_prob_recipe_info",
    "enable_special_tokens",
    "num_hidden_layers",
)


@pytest.mark.parametrize("name", sorted(SWEEP_CARDS))
def test_cpu_scale_keeps_each_cards_task(name):
    card = SWEEP_CARDS[name]
    members = sweep.expand(SWEEP_CONFIGS.get_config(name + ",cpu"))
    assert len(members) == len(REFERENCE_CARDS[card])
    for member in members:
        expected = reference_args(card, member.index)
        got = as_reference_args(member.config)
        assert {f: got[f] for f in TASK_FIELDS} == {f: expected[f] for f in TASK_FIELDS}
        assert member.config.model.hidden_size == 64
        assert member.config.train.batch_size == 32
        assert member.config.train.n_tasks == min(expected["n_tasks"], 32 * 1000)


def test_no_name_runs_the_headline_and_says_what_it_runs(capsys):
    config = SWEEP_CONFIGS.get_config()
    out = capsys.readouterr().out
    assert "headline: `vocab`" in out and "30 member(s)" in out and "50000" in out
    assert " h on one H100" in out
    assert config.sweep.axes == SWEEP_CONFIGS.get_config("vocab").sweep.axes
    assert SWEEP_CONFIGS.get_config(",cpu").model.hidden_size == 64


@pytest.mark.parametrize("arg", ["nope", "vocab,gpu"])
def test_unknown_sweep_or_scale_is_one_line_listing_the_names(arg):
    with pytest.raises(ValueError) as error:
        SWEEP_CONFIGS.get_config(arg)
    message = str(error.value)
    assert "\n" not in message
    assert all(name in message for name in SWEEP_CARDS) and ",cpu" in message


# ---- The reference's world size ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, per_device", [("default", 64), ("chain_length", 32), ("recipe_alpha", 16)]
)
def test_reference_world_size_scales_the_global_batch(name, per_device):
    world = int(np.random.default_rng().integers(2, 9))
    config = SWEEP_CONFIGS.get_config(name)
    config.train.reference_world_size = world
    for member in sweep.expand(config):
        assert member.config.train.batch_size == per_device * world
        exp = experiment.setup(member.config)
        assert exp.total_steps == member.config.train.n_tasks // (per_device * world)
        # The reference names a run by its per-rank batch.
        card_args = reference_args(SWEEP_CARDS[name], member.index)
        assert member.name.startswith(reference_str(card_args) + "_")
        assert f"_world_{world}" in member.name


def test_reference_world_size_must_split_the_batch():
    config = config_lib.get_base_config()
    config.train.batch_size = 48
    config.train.reference_world_size = 5
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config\.train\.reference_world_size=5 is invalid: expected a "
        r"divisor of train\.batch_size=48",
    ):
        config_lib.validate_train(config.train)
    config.train.reference_world_size = 0
    with pytest.raises(config_lib.ConfigError, match="reference_world_size=0 is invalid"):
        config_lib.validate_train(config.train)


# ---- Run names -----------------------------------------------------------------------------------


def test_run_name_of_the_defaults_is_the_reference_name():
    config = config_lib.get_base_config()
    assert config_lib.reference_run_name(config) == (
        "llama_L_4_V_1024_heads_32_M_4_N_4_C_2_n_ex_40_n_dims_10_hs_2048_bs_64_act_leaky_relu"
        "_prompt_standard_recipe_none"
    )
    assert (
        config_lib.run_name(config) == config_lib.reference_run_name(config) + "_H_1_uH_-1_seed_42"
    )


@pytest.mark.parametrize(
    "name", ["vocab", "parents", "hybrid_sanity", "recipe_alpha", "probabilistic_chain_length"]
)
def test_run_names_match_the_reference_for_card_members(name):
    # alpha 0, 0.5, 1, 2 and inf (written by the card as Python ints where whole), variable
    # choices (3-4), pools, per-rank batches of 64, 32 and 16.
    card = SWEEP_CARDS[name]
    for member in sweep.expand(SWEEP_CONFIGS.get_config(name)):
        args = reference_args(card, member.index)
        assert config_lib.reference_run_name(member.config) == reference_str(args)
        uh = -1 if args["num_unique_H"] is None else args["num_unique_H"]
        assert (
            config_lib.run_name(member.config)
            == f"{reference_str(args)}_H_{args['H_num_layers']}_uH_{uh}_seed_{args['seed']}"
        )


def test_run_name_of_a_random_config_matches_the_reference():
    rng = np.random.default_rng()
    config = config_lib.get_base_config()
    alpha = float(rng.choice([0.0, 0.25, 3.0, math.inf]))
    fields = dict(
        num_hidden_layers=int(rng.integers(1, 20)),
        vocab_size=int(rng.integers(64, 4096)),
        num_attention_heads=int(rng.choice([4, 8, 16])),
        n_parent_choices=(2, 3),
        n_input_choices=(3, 4, 5),
        chain_length_choices=(int(rng.integers(1, 6)),),
        n_example_choices=(5, 10),
        n_dims=int(rng.integers(2, 64)),
        hidden_size=int(rng.choice([64, 256])),
        batch_size=int(rng.choice([8, 24])),
        activation=str(rng.choice(["relu", "silu"])),
        prompt_strategy="hybrid_special_token",
        cot_example_prob_recipe_info=_power_law(int(alpha) if alpha.is_integer() else alpha),
        model_type="llama",
    )
    for name in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        config.model[name] = fields[name]
    for name in (
        "vocab_size",
        "n_parent_choices",
        "n_input_choices",
        "chain_length_choices",
        "n_example_choices",
        "n_dims",
        "activation",
        "prompt_strategy",
    ):
        config.data[name] = fields[name]
    config.data.cot_example_prob_recipe_info = _power_law(alpha)  # a float here, whole or not
    config.train.batch_size = fields["batch_size"] * 2
    config.train.reference_world_size = 2
    config.data.cot_example_prob_recipe_order = "curriculum"
    assert config_lib.reference_run_name(config) == reference_str(fields)
    assert (
        config_lib.run_name(config)
        == reference_str(fields) + "_H_1_uH_-1_seed_42_world_2_order_curriculum"
    )


# ---- Shipped configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates(path):
    config = load(path)
    for member in sweep.expand(config) if config.sweep.axes else [None]:
        member_config = config if member is None else member.config
        exp = experiment.setup(member_config)
        assert exp.total_steps >= 1
        assert config_lib.run_name(member_config).startswith(
            f"llama_L_{member_config.model.num_hidden_layers}_"
        )


def test_default_is_the_reference_run():
    config = load(os.path.join(ROOT, "configs", "default.py"))
    exp = experiment.setup(config)
    assert exp.total_steps == 50_000 and config.train.batch_size == 64
    assert (config.train.lr, config.train.weight_decay) == (5e-5, 0.01)
    shapes = jax.eval_shape(lambda: model.init(exp.model_config, experiment.model_key(0))[1])
    assert round(model.count_params(shapes) / 1e6) == 245  # the reference's depth-4 model
    # The reference's arithmetic: float32 compute, every product at full float32 precision.
    assert exp.model_config.dtype == "float32"
    assert exp.model_config.resolved_matmul_precision == "highest"
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {np.dtype("float32")}


def test_quickstart_dag_is_the_documented_one():
    # configs/quickstart.py and the README explain its result by this DAG, drawn from seed 42:
    # y0 = g(x2, x0), y1 = g(x1, y0), y2 = y3 = g(x2, y1) (index n + j names chain token j).
    config = load(os.path.join(ROOT, "configs", "quickstart.py"))
    member = sweep.expand(config)[0].config
    spec = data.TaskSpec.from_config(member)
    world = data.make_world(data.root_keys(member.seed)["world"], spec)
    parents = [set(row.tolist()) for row in np.asarray(world["fixed_adj"])]
    assert parents == [{2, 0}, {1, 3}, {2, 4}, {2, 4}]
    assert world["processor_pool"].shape[0] == 1


ROOT = os.path.join(os.path.dirname(__file__), "..")


def run_main(*flags):
    return subprocess.run(
        [sys.executable, "-m", "cotlab_jax.main", *flags],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_config_file_that_fails_to_load_is_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    raise KeyError(f'no sweep {arg!r}')\n")
    result = run_main(f"--config={broken}:x", f"--workdir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: flag --config={broken}:x: KeyError: \"no sweep 'x'\""
    ]
    missing = run_main(f"--config={tmp_path / 'missing.py'}")
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert "No such file" in missing.stderr
    assert not (tmp_path / "run").exists()


def test_overriding_a_swept_field_is_refused_before_compiling(tmp_path):
    result = run_main(
        "--config=configs/quickstart.py",
        "--config.data.prompt_strategy=cot_special_token",
        f"--workdir={tmp_path / 'quickstart'}",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: --config.data.prompt_strategy overrides a swept field: "
            "config.sweep.axes sweeps "
            "data.prompt_strategy over ('cot', 'standard')"
        )
    )
    assert not (tmp_path / "quickstart").exists()


def test_check_overrides_compares_dotted_paths():
    config = load(os.path.join(os.path.dirname(__file__), "configs", "tiny_sweep.py"))
    sweep.check_overrides(config, ["train.batch_size", "sweep.member", "data.vocab_size"])
    for path in ("train.lr", "data", "train"):  # the field itself, or a group holding it
        with pytest.raises(config_lib.ConfigError, match=r"config.sweep.axes sweeps "):
            sweep.check_overrides(config, [path])
    config.sweep.axes = (("data.cot_example_prob_recipe_info.alpha", (0.0, 1.0)),)
    with pytest.raises(config_lib.ConfigError, match="recipe_info.alpha over"):
        sweep.check_overrides(config, ["data.cot_example_prob_recipe_info"])
