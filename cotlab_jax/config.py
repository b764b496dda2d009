"""The configuration schema: one grouped ml_collections ConfigDict with the reference's defaults.

Field names follow the PyTorch CoT-ICL Lab `Args` (core/args.py) where one exists, so a task card
ports line by line: `Args(vocab_size=64, prompt_strategy="cot")` becomes
`config.data.vocab_size = 64` and `config.data.prompt_strategy = "cot"`. Groups: `data` (the task
distribution), `model` (the Llama decoder), `train`, `eval`, `mesh`, `sweep`, `log`; `seed` sits at
the top because data, model and evaluation all derive their keys from it. docs/tasks.md lists the
defaults and where this lab departs from the reference.
"""

import math
from collections.abc import Callable, Mapping
from typing import NoReturn

import ml_collections
import numpy as np

PROMPT_STRATEGIES = (
    "standard",
    "cot",
    "standard_special_token",
    "cot_special_token",
    "hybrid_special_token",
)
ACTIVATIONS = ("identity", "relu", "silu", "leaky_relu")
RECIPE_TYPES = ("power_law",)
RECIPE_ORDERS = ("shuffled", "curriculum")
DAG_STRATEGIES = ("random",)
NUM_RESERVED_TOKENS = 9


def uses_special_tokens(prompt_strategy: str) -> bool:
    """Special tokens follow from the prompt strategy, as in the reference's task cards."""
    return prompt_strategy.endswith("_special_token")


def data_config() -> ml_collections.ConfigDict:
    """The task distribution. Defaults: the reference's `Args()` (N=M=4, C=2, K=40, V=1024, d=10,
    `standard` prompts). The reference's `num_unique_H=None` (no processor pool) is -1 here and its
    empty recipe `{}` is None; special tokens follow from the prompt strategy."""
    return ml_collections.ConfigDict(
        dict(
            vocab_size=1024,
            n_dims=10,
            n_input_choices=(4,),
            n_parent_choices=(4,),
            chain_length_choices=(2,),
            n_example_choices=(40,),
            data_initializer_range=1.0,
            dag_strategy="random",
            ablation_fixed_dag=False,
            activation="leaky_relu",
            H_num_layers=1,
            ablation_fixed_H=False,
            num_unique_H=-1,
            prompt_strategy="standard",
            # None, or {"type": "power_law", "initial_prob", "final_prob", "alpha", "scale"}.
            cot_example_prob_recipe_info=ml_collections.config_dict.placeholder(dict),
            # How the recipe's prompt index is drawn: "shuffled" (a uniform random index in
            # [0, n_tasks), the reference's behaviour) or "curriculum" (the task's position in
            # training order).
            cot_example_prob_recipe_order="shuffled",
        )
    )


def model_config() -> ml_collections.ConfigDict:
    """The Llama decoder. Defaults: the reference's depth-4, hidden-2048 model (its `Args()` and
    `transformers.LlamaConfig`'s defaults), computed as the reference computes, in float32 at
    full precision (no autocast; torch's float32 matmuls are not TF32 by default). bfloat16
    compute (`dtype="bfloat16"`) is faster on accelerators, and this lab's option."""
    return ml_collections.ConfigDict(
        dict(
            num_hidden_layers=4,
            hidden_size=2048,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            rms_norm_eps=1e-6,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=1.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=1000,
            ),
            tie_word_embeddings=True,
            initializer_range=0.02,
            dtype="float32",  # compute dtype ("float32" or "bfloat16"); parameters: float32
            remat_policy="none",  # "none", "full", or a jax.checkpoint_policies name
            attention_impl="auto",  # "auto" (cuDNN where offered), "xla", "cudnn"
            # "auto" (= "highest", true float32, with float32 dtype; JAX's default with bfloat16),
            # "default", "high", "highest": every matmul, einsum and attention in the model
            matmul_precision="auto",
        )
    )


# The reference's `Args.batch_size`: the batch of each of its DDP ranks.
REFERENCE_BATCH_SIZE = 64


def set_per_device_batch(train, per_device_batch_size: int) -> None:
    """`train.batch_size = per_device_batch_size x train.reference_world_size`, kept linked, so
    `--config.train.reference_world_size=W` reproduces a reference run on W GPUs (the reference's
    `batch_size` is per DDP rank). Setting `train.batch_size` itself later breaks the link."""
    train.batch_size = per_device_batch_size * train.get_ref("reference_world_size")


def train_config() -> ml_collections.ConfigDict:
    """AdamW at the reference's settings (torch defaults, lr 5e-5 constant), 3.2M tasks.

    `batch_size` is the global batch this lab trains on. The reference trains under DDP with a
    per-rank `batch_size` of 64, so a reference run on W GPUs has a global batch of 64 x W and
    takes n_tasks / (64 x W) steps; `reference_world_size` W (default 1) scales the linked
    `batch_size` (see `set_per_device_batch`) and names the per-rank batch in `run_name`."""
    train = ml_collections.ConfigDict(
        dict(
            n_tasks=64 * 50_000,
            reference_world_size=1,
            lr=5e-5,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            warmup_steps=0,
            lr_schedule="constant",  # "constant", "cosine", "linear"
            grad_clip_norm=0.0,  # 0 disables clipping
            log_every_n_steps=100,
            checkpoint_every_n_steps=500,
            keep_checkpoints=3,
        )
    )
    set_per_device_batch(train, REFERENCE_BATCH_SIZE)
    return train


def eval_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            n_eval_tasks=10_000,
            eval_every_n_steps=500,
            batch_size=64,
            max_pred_tokens=100,
            # How a special-token output is read (`cotlab_jax.evaluate.extract_answers`):
            # "reference" is the reference trainer's rule (pads stripped, [-4] <ans_s>, [-2]
            # <ans_e>, no <eos> check), "vllm" its sampling evaluator's, "strict" this lab's
            # (the output ends exactly <ans_s> a <ans_e> <eos>).
            answer_rule="reference",
            # The final evaluation also measures accuracy against the number of in-context
            # examples kept (the last K' of each task): "" for none, "all" for 1..K, or a
            # comma-separated list such as "1,2,4,8".
            example_counts="",
            # Every evaluation also logs the analyses (`cotlab_jax.analysis`: attention to the DAG
            # parents on the first `analysis_tasks` eval tasks, the embedding probe and CKA) as
            # the metrics kind "analysis". Captured attention takes 4 * layers * heads * L^2
            # bytes per task, hence its own batch size.
            analyses=False,
            analysis_tasks=256,
            analysis_batch_size=16,
        )
    )


def mesh_config() -> ml_collections.ConfigDict:
    # Axis sizes; -1 takes the remaining devices.
    return ml_collections.ConfigDict(dict(replica=1, data=-1, fsdp=1, tensor=1))


ANSWER_RULES = ("reference", "vllm", "strict")
PACKINGS = ("exact", "padded", "size", "off")


def sweep_config() -> ml_collections.ConfigDict:
    """A sweep (see `cotlab_jax.sweep`): no axes means a single run."""
    return ml_collections.ConfigDict(
        dict(
            name="",
            # ((field path, (values, ...)), ...): the members are the product, first axis
            # slowest, e.g. (("model.num_hidden_layers", (4, 8)), ("data.vocab_size", (64,))).
            axes=(),
            member=-1,  # >= 0: run only this member (to fan a sweep out over hosts or slices)
            # "exact": pack members whose programs agree, sequence length included; "padded":
            # also pack shorter sequences, left-padded; "size": train as "padded", and at the
            # end evaluate members that differ only in model sizes as one size-packed program
            # (`cotlab_jax.size_packing`); "off": every member alone.
            packing="exact",
            max_pack_size=0,  # 0: no limit
        )
    )


def get_base_config() -> ml_collections.ConfigDict:
    """The full configuration with the reference's defaults (its `Args()`)."""
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.data = data_config()
    config.model = model_config()
    config.train = train_config()
    config.eval = eval_config()
    config.mesh = mesh_config()
    config.sweep = sweep_config()
    config.log = ml_collections.ConfigDict(dict(tensorboard=True, progress_bar=True))
    return config


class ConfigError(ValueError):
    """A configuration value is out of range; the message names field, value and what is allowed."""


# Validation: every check below raises through `invalid`, so every message has one form,
# "config.<field>=<value> is invalid: <what is allowed>."


def invalid(name: str, value, allowed: str) -> ConfigError:
    """The error for `name=value` (`name` as the user wrote it, e.g. `config.train.lr` or
    `--example_counts`)."""
    return ConfigError(f"{name}={value!r} is invalid: {allowed}.")


def fail(field: str, value, allowed: str) -> NoReturn:
    """Raises the error for `config.<field>=value`."""
    raise invalid(f"config.{field}", value, allowed)


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(field: str, value, minimum: int) -> None:
    """`config.<field>` must be an integer >= `minimum` (bools are not integers)."""
    if not (is_int(value) and value >= minimum):
        fail(
            field,
            value,
            "expected a positive integer" if minimum == 1 else f"expected an integer >= {minimum}",
        )


def check_number(
    field: str, value, within: Callable[[float], bool], allowed: str, *, allow_inf: bool
) -> None:
    """`config.<field>` must be a real number (not a bool, never NaN; +-inf only with
    `allow_inf`, which every field decides explicitly) for which `within` holds."""
    ok = (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and not math.isnan(value)
        and (allow_inf or math.isfinite(value))
        and within(value)
    )
    if not ok:
        fail(field, value, allowed)


def _check_choices(field: str, value):
    choices = tuple(value) if isinstance(value, (list, tuple)) else ()
    if not choices or not all(is_int(choice) and choice >= 1 for choice in choices):
        fail(field, value, "expected a non-empty tuple of positive integers")


def _check_one_of(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        fail(field, value, f"expected one of {allowed}")


def validate_data(data, n_tasks: int = 1) -> None:
    """Rejects an invalid `config.data` (and the recipe's `n_tasks`) before anything compiles."""
    for name in (
        "n_input_choices",
        "n_parent_choices",
        "chain_length_choices",
        "n_example_choices",
    ):
        _check_choices(f"data.{name}", data[name])
    for name in ("vocab_size", "n_dims", "H_num_layers"):
        check_int(f"data.{name}", data[name], 1)
    check_int("train.n_tasks", n_tasks, 1)
    _check_one_of("data.activation", data.activation, ACTIVATIONS)
    _check_one_of("data.prompt_strategy", data.prompt_strategy, PROMPT_STRATEGIES)
    _check_one_of("data.dag_strategy", data.dag_strategy, DAG_STRATEGIES)
    check_number(
        "data.data_initializer_range",
        data.data_initializer_range,
        lambda x: x > 0,
        "expected a positive number (finite)",
        allow_inf=False,
    )
    special = uses_special_tokens(data.prompt_strategy)
    usable = data.vocab_size - (NUM_RESERVED_TOKENS if special else 0)
    if usable < 2:
        fail(
            "data.vocab_size",
            data.vocab_size,
            f"prompt_strategy {data.prompt_strategy!r} reserves "
            f"{NUM_RESERVED_TOKENS if special else 0} ids; at least 2 usable ids are needed, so "
            f"vocab_size must be >= {NUM_RESERVED_TOKENS * special + 2}",
        )
    if data.ablation_fixed_H:
        check_int("data.num_unique_H", data.num_unique_H, 1)
    elif data.num_unique_H != -1:
        fail(
            "data.num_unique_H",
            data.num_unique_H,
            "a processor pool needs data.ablation_fixed_H=True; leave num_unique_H=-1 otherwise",
        )
    if data.ablation_fixed_dag:
        for name in ("n_input_choices", "n_parent_choices", "chain_length_choices"):
            if len(data[name]) != 1:
                fail(
                    f"data.{name}",
                    data[name],
                    "data.ablation_fixed_dag draws one DAG for every task, so n, m and c need a "
                    "single choice each",
                )
    _validate_recipe(data)


def _validate_recipe(data) -> None:
    recipe = data.cot_example_prob_recipe_info
    _check_one_of(
        "data.cot_example_prob_recipe_order", data.cot_example_prob_recipe_order, RECIPE_ORDERS
    )
    if data.prompt_strategy == "hybrid_special_token" and recipe is None:
        fail(
            "data.cot_example_prob_recipe_info",
            recipe,
            "prompt_strategy 'hybrid_special_token' needs a recipe, e.g. {'type': 'power_law', "
            "'initial_prob': 0.0, 'final_prob': 1.0, 'alpha': 1.0, 'scale': 1.0}",
        )
    if recipe is None:
        return
    if data.prompt_strategy != "hybrid_special_token":
        fail(
            "data.cot_example_prob_recipe_info",
            dict(recipe),
            "a CoT-probability recipe applies only to prompt_strategy 'hybrid_special_token'",
        )
    field = "data.cot_example_prob_recipe_info"
    _check_one_of(f"{field}.type", recipe.get("type"), RECIPE_TYPES)
    for key in ("initial_prob", "final_prob"):
        check_number(
            f"{field}.{key}",
            recipe.get(key),
            lambda x: 0 <= x <= 1,
            "expected a probability in [0, 1]",
            allow_inf=False,
        )
    # alpha = inf is the recipe's "no CoT" end (CoT probability initial_prob throughout).
    check_number(
        f"{field}.alpha",
        recipe.get("alpha"),
        lambda x: x >= 0,
        "expected alpha >= 0 (inf means no CoT)",
        allow_inf=True,
    )
    check_number(
        f"{field}.scale",
        recipe.get("scale"),
        lambda x: True,
        "expected a finite number",
        allow_inf=False,
    )


LR_SCHEDULES = ("constant", "cosine", "linear")


def validate_train(train) -> None:
    """Rejects an invalid `config.train` before anything compiles."""
    for name in (
        "n_tasks",
        "batch_size",
        "log_every_n_steps",
        "checkpoint_every_n_steps",
        "keep_checkpoints",
        "reference_world_size",
    ):
        check_int(f"train.{name}", train[name], 1)
    if train.batch_size % train.reference_world_size:
        fail(
            "train.reference_world_size",
            train.reference_world_size,
            f"expected a divisor of train.batch_size={train.batch_size} (the global batch is "
            "split evenly over the reference's ranks)",
        )
    if train.n_tasks < train.batch_size:
        fail(
            "train.n_tasks",
            train.n_tasks,
            f"expected at least one batch (train.batch_size={train.batch_size})",
        )
    # The optimizer's numbers are all finite: an infinite one makes every update NaN.
    for name in ("lr", "eps"):
        check_number(
            f"train.{name}",
            train[name],
            lambda x: x > 0,
            "expected a positive number",
            allow_inf=False,
        )
    for name in ("b1", "b2"):
        check_number(
            f"train.{name}",
            train[name],
            lambda x: 0 <= x < 1,
            "expected a number in [0, 1)",
            allow_inf=False,
        )
    for name in ("weight_decay", "grad_clip_norm"):
        check_number(
            f"train.{name}",
            train[name],
            lambda x: x >= 0,
            "expected a number >= 0 (0 disables it)",
            allow_inf=False,
        )
    check_int("train.warmup_steps", train.warmup_steps, 0)
    _check_one_of("train.lr_schedule", train.lr_schedule, LR_SCHEDULES)


def validate_eval(eval_cfg) -> None:
    """Rejects an invalid `config.eval` before anything compiles (its example counts are
    checked against the tasks' example count by `parse_example_counts`)."""
    for name in (
        "n_eval_tasks",
        "eval_every_n_steps",
        "batch_size",
        "max_pred_tokens",
        "analysis_tasks",
        "analysis_batch_size",
    ):
        check_int(f"eval.{name}", eval_cfg[name], 1)
    _check_one_of("eval.answer_rule", eval_cfg.answer_rule, ANSWER_RULES)


def parse_example_counts(
    value, max_examples: int, name: str = "config.eval.example_counts", allow_empty: bool = True
) -> tuple[int, ...]:
    """Example counts K' (the last K' examples of each task kept) as a tuple of distinct ints in
    [1, max_examples], in the given order: the one parser of `config.eval.example_counts`, the
    evaluation command's `--example_counts` and `evaluate.evaluate_over_k`'s argument.

    `value` is text ("" for none, "all" for 1 .. max_examples, or "1,2,4") or a sequence of
    integers. `name` is the field as the user wrote it, for the message.
    """
    if isinstance(value, str):
        text = value.strip()
        if text == "all":
            return tuple(range(1, max_examples + 1))
        parts = [part.strip() for part in text.split(",")] if text else []
        if not all(part.isdigit() for part in parts):
            raise invalid(
                name, value, "expected '', 'all' or comma-separated positive integers like '1,2,4'"
            )
        counts = tuple(int(part) for part in parts)
    else:
        counts = tuple(value)
        for count in counts:
            if not is_int(count):
                raise invalid(name, value, f"{count!r} is not an integer")
    if not counts and not allow_empty:
        raise invalid(name, value, f"expected at least one count in [1, {max_examples}]")
    for count in counts:
        if not 1 <= count <= max_examples:
            raise invalid(
                name,
                value,
                f"{count} is not an integer in [1, {max_examples}] (the "
                f"tasks have at most {max_examples} examples)",
            )
    if len(set(counts)) != len(counts):
        raise invalid(name, value, "every count may appear once")
    return tuple(int(count) for count in counts)


MESH_BATCH_FIELDS = ("train.batch_size", "eval.batch_size")


def check_mesh(config, mesh_shape: Mapping[str, int], n_members: int | None = None) -> None:
    """The one check that a config's arrays divide over a mesh (axis name -> size): attention
    heads and the MLP over `tensor`, the batch sizes over `data` x `fsdp`, and (given
    `n_members`) the members of a pack over `replica`."""
    tensor = mesh_shape["tensor"]
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if config.model[name] % tensor:
            fail(
                f"model.{name}",
                config.model[name],
                f"expected a multiple of the mesh's tensor size, {tensor}",
            )
    batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
    fields = MESH_BATCH_FIELDS + (("eval.analysis_batch_size",) if config.eval.analyses else ())
    for field in fields:
        group, name = field.split(".")
        if config[group][name] % batch_shards:
            fail(
                field,
                config[group][name],
                f"expected a multiple of the mesh's data x fsdp size, {batch_shards}",
            )
    if n_members is not None and n_members % mesh_shape["replica"]:
        fail(
            "mesh.replica",
            mesh_shape["replica"],
            f"expected a divisor of the pack size, {n_members} (or set config.sweep.max_pack_size)",
        )


def validate_sweep(sweep) -> None:
    """Rejects an invalid `config.sweep` (its axes' fields are checked when they are expanded)."""
    _check_one_of("sweep.packing", sweep.packing, PACKINGS)
    if not (is_int(sweep.max_pack_size) and sweep.max_pack_size >= 0):
        fail("sweep.max_pack_size", sweep.max_pack_size, "expected an integer >= 0 (0: no limit)")
    for axis in sweep.axes:
        if (
            not isinstance(axis, (list, tuple))
            or len(axis) != 2
            or not isinstance(axis[0], str)
            or not isinstance(axis[1], (list, tuple))
            or not axis[1]
        ):
            fail(
                "sweep.axes",
                sweep.axes,
                "expected ((field path, (value, ...)), ...) with at least one value per axis",
            )


# The reference's run name (`str(Args)`, core/args.py) spells out these fields, in this order.
REFERENCE_RUN_NAME_FIELDS = (
    "model.num_hidden_layers",
    "data.vocab_size",
    "model.num_attention_heads",
    "data.n_parent_choices",
    "data.n_input_choices",
    "data.chain_length_choices",
    "data.n_example_choices",
    "data.n_dims",
    "model.hidden_size",
    "train.batch_size",
    "train.reference_world_size",
    "data.activation",
    "data.prompt_strategy",
    "data.cot_example_prob_recipe_info.type",
    "data.cot_example_prob_recipe_info.alpha",
)
# The fields `run_name` spells out: the reference's, then this lab's additions.
RUN_NAME_FIELDS = REFERENCE_RUN_NAME_FIELDS + (
    "data.H_num_layers",
    "data.num_unique_H",
    "seed",
    "data.cot_example_prob_recipe_order",
)


def _name_number(value) -> str:
    """A number as the reference's cards write it: its integers are Python ints (`alpha_2`)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def reference_run_name(config) -> str:
    """The reference's run name for this config's fields (its `str(Args)`), e.g.
    `llama_L_4_V_1024_heads_32_M_4_N_4_C_2_n_ex_40_n_dims_10_hs_2048_bs_64_act_leaky_relu_`
    `prompt_standard_recipe_none`; `bs` is the per-rank batch, `batch_size / reference_world_size`.
    (Its non-special-token trainer appends a launch timestamp to name the output directory.)"""
    data, model = config.data, config.model

    def choices(values):
        return "-".join(str(v) for v in values)

    recipe = data.cot_example_prob_recipe_info
    recipe_name = (
        "none" if not recipe else f"type_{recipe['type']}_alpha_{_name_number(recipe['alpha'])}"
    )
    per_rank_batch = config.train.batch_size // config.train.reference_world_size
    return "_".join(
        (
            "llama",
            f"L_{model.num_hidden_layers}",
            f"V_{data.vocab_size}",
            f"heads_{model.num_attention_heads}",
            f"M_{choices(data.n_parent_choices)}",
            f"N_{choices(data.n_input_choices)}",
            f"C_{choices(data.chain_length_choices)}",
            f"n_ex_{choices(data.n_example_choices)}",
            f"n_dims_{data.n_dims}",
            f"hs_{model.hidden_size}",
            f"bs_{per_rank_batch}",
            f"act_{data.activation}",
            f"prompt_{data.prompt_strategy}",
            f"recipe_{recipe_name}",
        )
    )


def run_name(config) -> str:
    """The reference's run name, then what it does not spell out: processor layers and pool, the
    seed, the reference's world size when above 1, and a recipe's order when not the reference's
    (`shuffled`). Runs of the same reference config line up across the two codebases."""
    data = config.data
    extra = [f"H_{data.H_num_layers}", f"uH_{data.num_unique_H}", f"seed_{config.seed}"]
    if config.train.reference_world_size != 1:
        extra.append(f"world_{config.train.reference_world_size}")
    if data.cot_example_prob_recipe_info and data.cot_example_prob_recipe_order != "shuffled":
        extra.append(f"order_{data.cot_example_prob_recipe_order}")
    return "_".join((reference_run_name(config), *extra))
