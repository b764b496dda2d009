"""The jittable core of training, shared by a single run and a pack of sweep members: the
experiment a config describes, the train state's layout over a mesh, its initialisation, and the
train step.

The batch of step s is `data.sample_batch(world, train_key, s)`, drawn inside the train step, so
there is no host data pipeline and a resumed run regenerates exactly the data it would have seen.
The train state (parameters, optimizer state, the step, the current logging window's sums and
the first non-finite step) is one pytree, checkpointed whole.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cotlab_jax import config as config_lib
from cotlab_jax import data, losses, model, sharding


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything static about a run, derived from its config once."""

    config: ml_collections.ConfigDict
    spec: data.TaskSpec
    model_config: model.LlamaConfig
    total_steps: int
    mesh: jax.sharding.Mesh

    @property
    def batch_size(self) -> int:
        return self.config.train.batch_size


def training_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The mesh `config.mesh` asks for, over all devices."""
    try:
        return sharding.make_mesh(dict(config.mesh))
    except ValueError as error:
        raise config_lib.invalid("config.mesh", dict(config.mesh), str(error)) from None


def model_config(config: ml_collections.ConfigDict, spec: data.TaskSpec) -> model.LlamaConfig:
    """The run's model: `config.model` over the task's vocabulary. As the reference, with special
    tokens the embedding has padding_idx = the pad id (V-1)."""
    padding_idx = spec.token_id("pad") if spec.special_tokens else None
    return model.LlamaConfig.from_config(config.model, config.data.vocab_size, padding_idx)


def setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Experiment:
    """Validates every config group (before anything compiles) and derives the experiment, on
    `mesh` (default: `training_mesh(config)`). The mesh is where a run is placed, not part of
    what it is: a run trained on one mesh is loaded, evaluated or resumed on another."""
    spec = data.TaskSpec.from_config(config)
    llama_config = model_config(config, spec)
    config_lib.validate_train(config.train)
    config_lib.validate_eval(config.eval)
    config_lib.parse_example_counts(config.eval.example_counts, spec.K)
    mesh = training_mesh(config) if mesh is None else mesh
    config_lib.check_mesh(config, mesh.shape)
    return Experiment(
        config=config,
        spec=spec,
        model_config=llama_config,
        total_steps=config.train.n_tasks // config.train.batch_size,
        mesh=mesh,
    )


# The optimizer's numbers. A pack of sweep members passes them traced, one per member, so members
# that differ only in these share one program; the rest of `config.train` shapes the program.
OPTIMIZER_HPARAMS = ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip_norm")


def optimizer_hparams(train_cfg) -> dict[str, float]:
    return {name: float(train_cfg[name]) for name in OPTIMIZER_HPARAMS}


def make_optimizer(
    train_cfg, total_steps: int, hparams: dict | None = None
) -> optax.GradientTransformation:
    """AdamW (weight decay on every parameter, as the reference), with optional warmup, decay and
    gradient clipping. `hparams` (numbers or traced scalars) override `OPTIMIZER_HPARAMS`;
    whether clipping is on stays `train_cfg.grad_clip_norm > 0`."""
    h = optimizer_hparams(train_cfg) if hparams is None else hparams
    decay_steps = max(total_steps - train_cfg.warmup_steps, 1)
    schedule = {
        "constant": optax.constant_schedule(h["lr"]),
        "cosine": optax.cosine_decay_schedule(h["lr"], decay_steps),
        "linear": optax.linear_schedule(h["lr"], 0.0, decay_steps),
    }[train_cfg.lr_schedule]
    if train_cfg.warmup_steps:
        warmup = optax.linear_schedule(0.0, h["lr"], train_cfg.warmup_steps)
        schedule = optax.join_schedules([warmup, schedule], [train_cfg.warmup_steps])
    optimizer = optax.adamw(
        schedule, b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["weight_decay"]
    )
    if train_cfg.grad_clip_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(h["grad_clip_norm"]), optimizer)
    return optimizer


def extra_window_metrics(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Loss terms a run logs besides its loss (window means over the steps that have them):
    a distillation logs its cross-entropy and its KL apart."""
    return ("ce", "kl") if "distill" in config else ()


def empty_window(extra: tuple[str, ...] = ()):
    window = dict(
        loss_sum=jnp.float32(0),
        steps=jnp.int32(0),
        n_cot=jnp.int32(0),
        n_direct=jnp.int32(0),
        tokens=jnp.int32(0),
        grad_norm=jnp.float32(0),
    )
    for name in extra:
        window[f"{name}_sum"] = jnp.float32(0)
        window[f"{name}_steps"] = jnp.int32(0)
    return window


def model_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), 1)


def _opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, small):
    """Optimizer moments mirror the parameters (and take their shardings); the rest (step
    counts) takes `small`, the sharding of the state's per-run scalars."""
    params_structure = jax.tree.structure(abstract_params)

    def is_params_like(x):
        return isinstance(x, type(abstract_params)) and jax.tree.structure(x) == params_structure

    def shard(x):
        if is_params_like(x):
            return param_shardings
        if x.ndim > len(small.spec):
            raise ValueError(f"optimizer state leaf of shape {x.shape} mirrors no parameter")
        return small

    return jax.tree.map(shard, abstract_opt_state, is_leaf=is_params_like)


def build_state(exp: Experiment, key: jax.Array):
    """A fresh train state, its model initialised from `key`."""
    _, params = model.init(exp.model_config, key)
    opt_state = make_optimizer(exp.config.train, exp.total_steps).init(params)
    return dict(
        step=jnp.int32(0),
        params=params,
        opt_state=opt_state,
        window=empty_window(extra_window_metrics(exp.config)),
        nonfinite_step=jnp.int32(-1),
    )


def state_layout(abstract, mesh: jax.sharding.Mesh, leading_names: tuple[str, ...] = ()):
    """`abstract` (a train state of `jax.ShapeDtypeStruct`s) with its shardings over `mesh`:
    parameters by their logical axes, Adam moments alike, per-run scalars replicated.
    `leading_names` name axes stacked in front of every leaf (("replica",) for a pack)."""
    lead = tuple(abstract["step"].shape)
    small = jax.sharding.NamedSharding(
        mesh,
        sharding.logical_to_mesh_spec(
            leading_names, lead, dict(mesh.shape), sharding.current_rules()
        ),
    )
    with jax.set_mesh(mesh):
        params = sharding.state_shardings(abstract["params"], mesh, leading_names)
    shardings = dict(
        step=small,
        params=params,
        opt_state=_opt_state_shardings(abstract["opt_state"], abstract["params"], params, small),
        window=jax.tree.map(lambda _: small, abstract["window"]),
        nonfinite_step=small,
    )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def abstract_state(exp: Experiment):
    """(graphdef, state as `jax.ShapeDtypeStruct`s carrying their shardings): the train state's
    layout over `exp.mesh`, with nothing allocated. The restore target and the AOT compile use
    it."""
    key = model_key(exp.config.seed)
    graphdef, _ = jax.eval_shape(functools.partial(model.init, exp.model_config), key)
    abstract = jax.eval_shape(functools.partial(build_state, exp), key)
    return graphdef, state_layout(abstract, exp.mesh)


def init_state(exp: Experiment):
    """(graphdef, state), the state created directly sharded over the experiment's mesh."""
    graphdef, abstract = abstract_state(exp)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    state = jax.jit(functools.partial(build_state, exp), out_shardings=shardings)(
        model_key(exp.config.seed)
    )
    return graphdef, state


def sample_train_batch(state, world, train_key, exp: Experiment):
    """The batch of `state["step"]`, drawn on device, sharded over the batch axes."""
    batch = data.sample_batch(world, train_key, state["step"], exp.spec, exp.batch_size)
    return {
        name: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
        for name, x in batch.items()
    }


def sampled_train_step(state, world, train_key, *, graphdef, exp: Experiment):
    """Samples the step's batch and trains on it: the step the training loop runs."""
    batch = sample_train_batch(state, world, train_key, exp)
    return train_step(state, batch, graphdef=graphdef, exp=exp)


def batch_loss(params, batch, graphdef) -> jax.Array:
    """The training loss of `batch` (the mean over its labelled tokens)."""
    logits = model.apply(
        graphdef, params, batch["input_ids"], batch["positions"], batch["attention_mask"]
    )
    return losses.teacher_forced_loss(logits, batch["labels"])[0]


def train_step(state, batch, *, graphdef, exp: Experiment, hparams: dict | None = None):
    """One AdamW step on `batch` (`hparams`: see `make_optimizer`)."""
    loss, grads = jax.value_and_grad(batch_loss)(state["params"], batch, graphdef)
    return apply_gradients(state, loss, grads, batch, exp=exp, hparams=hparams)


def apply_gradients(
    state,
    loss,
    grads,
    batch,
    *,
    exp: Experiment,
    hparams: dict | None = None,
    extra: dict | None = None,
):
    """The step's AdamW update from `grads` of `loss` (on `batch`), the non-finite guard and the
    logging window: what every step that trains a run's parameters shares. `extra` holds the
    step's values of `extra_window_metrics` (NaN: the step has none)."""
    optimizer = make_optimizer(exp.config.train, exp.total_steps, hparams)
    step = state["step"]
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # After a non-finite loss (or update) the state stops changing, so no checkpoint holds it.
    finite = jnp.isfinite(loss) & jax.tree.reduce(
        jnp.logical_and, jax.tree.map(lambda x: jnp.isfinite(x).all(), params)
    )
    healthy = finite & (state["nonfinite_step"] < 0)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(healthy, new, old),
        (params, opt_state),
        (state["params"], state["opt_state"]),
    )
    nonfinite_step = jnp.where(
        (state["nonfinite_step"] < 0) & ~finite, step, state["nonfinite_step"]
    )
    # Window sums restart at every logging boundary, a function of the step alone, so a resumed
    # run logs exactly the numbers of an uninterrupted one.
    previous = jax.tree.map(
        lambda x: jnp.where(step % exp.config.train.log_every_n_steps == 0, jnp.zeros_like(x), x),
        state["window"],
    )
    window = dict(
        loss_sum=previous["loss_sum"] + loss,
        steps=previous["steps"] + 1,
        n_cot=previous["n_cot"] + batch["n_cot"].sum(),
        n_direct=previous["n_direct"] + batch["n_direct"].sum(),
        tokens=previous["tokens"] + batch["attention_mask"].sum(dtype=jnp.int32),
        grad_norm=optax.tree.norm(grads),
    )
    for name, value in (extra or {}).items():
        present = jnp.isfinite(value)
        window[f"{name}_sum"] = previous[f"{name}_sum"] + jnp.where(present, value, 0.0)
        window[f"{name}_steps"] = previous[f"{name}_steps"] + present.astype(jnp.int32)
    return dict(
        step=step + 1,
        params=params,
        opt_state=opt_state,
        window=window,
        nonfinite_step=nonfinite_step,
    )


def compile_train_step(exp: Experiment, graphdef, state):
    """The jitted train step, its state donated and kept on its own shardings."""
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(
        functools.partial(sampled_train_step, graphdef=graphdef, exp=exp),
        donate_argnums=0,
        out_shardings=state_shardings,
    )


@dataclasses.dataclass
class Program:
    """The jitted training of one or more runs: the (possibly stacked) state, one step, and
    each run's own state in its single-run layout (what is evaluated and checkpointed)."""

    graphdef: object
    state: dict
    step: Callable[[dict], dict]
    member_state: Callable[[dict, int], dict]
    packed: bool
