"""Training: one jitted step that samples its own batch on device, AdamW, periodic evaluation on
the frozen eval set, orbax checkpoints and exact resumption.

The batch of step s is `data.sample_batch(world, train_key, s)`, drawn inside the train step, so
there is no host data pipeline and a resumed run regenerates exactly the data it would have seen.
The train state (parameters, optimizer state, the step, the current logging window's sums and
the first non-finite step) is one pytree, checkpointed whole.
"""

import dataclasses
import functools
import json
import os
import signal
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from cotlab_jax import config as config_lib
from cotlab_jax import data, evaluate, model, sharding
from cotlab_jax.metrics import MetricsWriter, read_metrics

# Config fields that change the shapes or structure of the checkpointed state.
STATE_SHAPE_FIELDS = (
    "data.vocab_size", "model.num_hidden_layers", "model.hidden_size", "model.intermediate_size",
    "model.num_attention_heads", "model.num_key_value_heads", "model.head_dim",
    "model.tie_word_embeddings",
)


class RunError(RuntimeError):
    """A run cannot start or go on; the message says why in one line."""


class NonFiniteLossError(RunError):
    pass


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


def setup(config: ml_collections.ConfigDict) -> Experiment:
    """Validates every config group (before anything compiles) and derives the experiment."""
    spec = data.TaskSpec.from_config(config)
    model_config = model.LlamaConfig.from_config(config.model, config.data.vocab_size)
    config_lib.validate_train(config.train)
    config_lib.validate_eval(config.eval)
    try:
        mesh = sharding.make_mesh(dict(config.mesh))
    except ValueError as e:
        raise config_lib.ConfigError(f"config.mesh is invalid: {e}") from None
    tensor = mesh.shape["tensor"]
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if config.model[name] % tensor:
            raise config_lib.ConfigError(
                f"config.model.{name}={config.model[name]} is invalid: expected a multiple of "
                f"config.mesh.tensor={tensor}")
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for group in ("train", "eval"):
        if config[group].batch_size % batch_shards:
            raise config_lib.ConfigError(
                f"config.{group}.batch_size={config[group].batch_size} is invalid: expected a "
                f"multiple of the mesh's data x fsdp size, {batch_shards}")
    return Experiment(config=config, spec=spec, model_config=model_config,
                      total_steps=config.train.n_tasks // config.train.batch_size, mesh=mesh)


def make_optimizer(train_cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW (weight decay on every parameter, as the reference), with optional warmup, decay and
    gradient clipping."""
    decay_steps = max(total_steps - train_cfg.warmup_steps, 1)
    schedule = {
        "constant": optax.constant_schedule(train_cfg.lr),
        "cosine": optax.cosine_decay_schedule(train_cfg.lr, decay_steps),
        "linear": optax.linear_schedule(train_cfg.lr, 0.0, decay_steps),
    }[train_cfg.lr_schedule]
    if train_cfg.warmup_steps:
        warmup = optax.linear_schedule(0.0, train_cfg.lr, train_cfg.warmup_steps)
        schedule = optax.join_schedules([warmup, schedule], [train_cfg.warmup_steps])
    optimizer = optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                            weight_decay=train_cfg.weight_decay)
    if train_cfg.grad_clip_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), optimizer)
    return optimizer


def empty_window():
    return dict(loss_sum=jnp.float32(0), steps=jnp.int32(0), n_cot=jnp.int32(0),
                n_direct=jnp.int32(0), tokens=jnp.int32(0), grad_norm=jnp.float32(0))


def model_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), 1)


def _opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, replicated):
    """Optimizer moments mirror the parameters (and take their shardings); the rest (step
    counts) is replicated."""
    params_structure = jax.tree.structure(abstract_params)

    def is_params_like(x):
        return isinstance(x, type(abstract_params)) and jax.tree.structure(x) == params_structure

    def shard(x):
        if is_params_like(x):
            return param_shardings
        if x.ndim:
            raise ValueError(f"optimizer state leaf of shape {x.shape} mirrors no parameter")
        return replicated

    return jax.tree.map(shard, abstract_opt_state, is_leaf=is_params_like)


def _build_state(exp: Experiment):
    _, params = model.init(exp.model_config, model_key(exp.config.seed))
    opt_state = make_optimizer(exp.config.train, exp.total_steps).init(params)
    return dict(step=jnp.int32(0), params=params, opt_state=opt_state, window=empty_window(),
                nonfinite_step=jnp.int32(-1))


def abstract_state(exp: Experiment):
    """(graphdef, state as `jax.ShapeDtypeStruct`s carrying their shardings): the train state's
    layout over `exp.mesh` (parameters by their logical axes, Adam moments alike, scalars
    replicated), with nothing allocated. The restore target and the AOT compile use it."""
    graphdef, _ = jax.eval_shape(functools.partial(model.init, exp.model_config),
                                 model_key(exp.config.seed))
    abstract = jax.eval_shape(functools.partial(_build_state, exp))
    replicated = jax.sharding.NamedSharding(exp.mesh, jax.P())
    with jax.set_mesh(exp.mesh):
        params = sharding.state_shardings(abstract["params"], exp.mesh)
    shardings = dict(
        step=replicated, params=params,
        opt_state=_opt_state_shardings(abstract["opt_state"], abstract["params"], params,
                                       replicated),
        window=jax.tree.map(lambda _: replicated, abstract["window"]),
        nonfinite_step=replicated)
    return graphdef, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def init_state(exp: Experiment):
    """(graphdef, state), the state created directly sharded over the experiment's mesh."""
    graphdef, abstract = abstract_state(exp)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    state = jax.jit(functools.partial(_build_state, exp), out_shardings=shardings)()
    return graphdef, state


def sample_train_batch(state, world, train_key, exp: Experiment):
    """The batch of `state["step"]`, drawn on device, sharded over the batch axes."""
    batch = data.sample_batch(world, train_key, state["step"], exp.spec, exp.batch_size)
    return {name: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
            for name, x in batch.items()}


def sampled_train_step(state, world, train_key, *, graphdef, exp: Experiment):
    """Samples the step's batch and trains on it: the step the training loop runs."""
    batch = sample_train_batch(state, world, train_key, exp)
    return train_step(state, batch, graphdef=graphdef, exp=exp)


def train_step(state, batch, *, graphdef, exp: Experiment):
    """One AdamW step on `batch`."""
    optimizer = make_optimizer(exp.config.train, exp.total_steps)
    step = state["step"]

    def loss_fn(params):
        logits = model.apply(graphdef, params, batch["input_ids"], batch["positions"],
                             batch["attention_mask"])
        return evaluate.teacher_forced_loss(logits, batch["labels"])[0]

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # After a non-finite loss (or update) the state stops changing, so no checkpoint holds it.
    finite = jnp.isfinite(loss) & jax.tree.reduce(
        jnp.logical_and, jax.tree.map(lambda x: jnp.isfinite(x).all(), params))
    healthy = finite & (state["nonfinite_step"] < 0)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(healthy, new, old),
                                     (params, opt_state), (state["params"], state["opt_state"]))
    nonfinite_step = jnp.where((state["nonfinite_step"] < 0) & ~finite, step,
                               state["nonfinite_step"])
    # Window sums restart at every logging boundary, a function of the step alone, so a resumed
    # run logs exactly the numbers of an uninterrupted one.
    window = jax.tree.map(
        lambda x: jnp.where(step % exp.config.train.log_every_n_steps == 0, jnp.zeros_like(x), x),
        state["window"])
    window = dict(
        loss_sum=window["loss_sum"] + loss, steps=window["steps"] + 1,
        n_cot=window["n_cot"] + batch["n_cot"].sum(),
        n_direct=window["n_direct"] + batch["n_direct"].sum(),
        tokens=window["tokens"] + batch["attention_mask"].sum(dtype=jnp.int32),
        grad_norm=optax.tree.norm(grads),
    )
    return dict(step=step + 1, params=params, opt_state=opt_state, window=window,
                nonfinite_step=nonfinite_step)


def compile_train_step(exp: Experiment, graphdef, state):
    """The jitted train step, its state donated and kept on its own shardings."""
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(functools.partial(sampled_train_step, graphdef=graphdef, exp=exp),
                   donate_argnums=0, out_shardings=state_shardings)


# ---------------------------------------------------------------------------------------------
# Run directories.


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise RunError(f"{workdir} holds no run (no config.json)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _prepare_workdir(workdir: str, config) -> None:
    """Creates the run directory, or checks that a resumed run keeps the state's shapes."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):  # unique: processes may probe at once
            pass
    except OSError as e:
        raise RunError(f"cannot write to workdir {workdir}: {e.strerror}") from None
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        saved, current = _flat(load_config(workdir)), _flat(json.loads(config.to_json()))
        differing = [f"{name} (checkpoint {saved.get(name)!r}, config {current.get(name)!r})"
                     for name in STATE_SHAPE_FIELDS if saved.get(name) != current.get(name)]
        if (saved.get("train.grad_clip_norm", 0) > 0) != (current["train.grad_clip_norm"] > 0):
            differing.append("train.grad_clip_norm (on/off changes the optimizer state)")
        if differing:
            raise RunError(f"{workdir} holds a run whose state has other shapes; differing "
                           f"fields: {', '.join(differing)}. Use another --workdir.")
    if jax.process_index() == 0:
        _write_json(path, json.loads(config.to_json()))


def _checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True))


def _eval_set(workdir: str, exp: Experiment) -> dict[str, np.ndarray]:
    """The frozen eval set: made once from `seed + 1000`, then reloaded from the run directory."""
    path = os.path.join(workdir, "eval_set.npz")
    if os.path.exists(path):
        try:
            return data.load_eval_set(path, exp.spec)
        except ValueError as e:
            raise RunError(f"{e}; the task config changed since this run started") from None
    keys = data.root_keys(exp.config.seed)
    world = data.make_world(keys["world"], exp.spec)  # on this process's default device
    eval_set = data.build_eval_set(world, keys["eval"], exp.spec, exp.config.eval.n_eval_tasks)
    if jax.process_index() == 0:
        data.save_eval_set(path, eval_set, exp.spec)
    return eval_set


@dataclasses.dataclass
class Run:
    """A trained run loaded back: what `python -m cotlab_jax.evaluate` needs."""

    config: ml_collections.ConfigDict
    spec: data.TaskSpec
    graphdef: object
    params: object
    step: int
    world: dict
    workdir: str


def load_run(workdir: str, step: int | str = "latest") -> Run:
    """The config, model and parameters of a run's checkpoint (`latest` or a step number)."""
    config = load_config(workdir)
    exp = setup(config)
    with _checkpoint_manager(workdir, config.train.keep_checkpoints) as manager:
        steps = manager.all_steps()
        if not steps:
            raise RunError(f"{workdir} has no checkpoint")
        if step == "latest":
            step = max(steps)
        elif int(step) not in steps:
            raise RunError(f"{workdir} has no checkpoint at step {step}; it has {sorted(steps)}")
        graphdef, target = abstract_state(exp)
        state = manager.restore(int(step), args=ocp.args.StandardRestore(target))
    world = data.make_world(data.root_keys(config.seed)["world"], exp.spec)
    return Run(config=config, spec=exp.spec, graphdef=graphdef, params=state["params"],
               step=int(step), world=world, workdir=workdir)


# ---------------------------------------------------------------------------------------------
# The training loop.


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (no signal work mid-step)."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)


def _check_finite(state, manager) -> None:
    bad = int(state["nonfinite_step"])
    if bad >= 0:
        latest = manager.latest_step()
        kept = f"the last good checkpoint is step {latest}" if latest is not None else \
            "no checkpoint was written"
        raise NonFiniteLossError(
            f"the training loss (or the updated parameters) became non-finite at step {bad + 1}; "
            f"stopping ({kept}). Try a lower train.lr, or set train.grad_clip_norm.")


def _window_metrics(state, seconds: float) -> dict:
    window = jax.device_get(state["window"])
    steps = max(int(window["steps"]), 1)
    return dict(loss=float(window["loss_sum"]) / steps, n_cot=int(window["n_cot"]),
                n_direct=int(window["n_direct"]), grad_norm=float(window["grad_norm"]),
                tokens_per_s=int(window["tokens"]) / max(seconds, 1e-9),
                step_time_s=seconds / steps)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the final results (also results.json)."""
    exp = setup(config)
    _prepare_workdir(workdir, config)
    cfg_train, cfg_eval = config.train, config.eval
    eval_set = _eval_set(workdir, exp)

    # Global (replicated) copies, made on every process alike, as the train step's inputs.
    replicated = jax.sharding.NamedSharding(exp.mesh, jax.P())
    world, train_key = jax.jit(
        lambda: (data.make_world(data.root_keys(config.seed)["world"], exp.spec),
                 data.root_keys(config.seed)["train"]), out_shardings=replicated)()
    eval_sharding = jax.sharding.NamedSharding(exp.mesh, jax.P(("data", "fsdp")))

    with jax.set_mesh(exp.mesh):
        manager = _checkpoint_manager(workdir, cfg_train.keep_checkpoints)
        start = manager.latest_step() or 0
        if start:  # restored straight into its (possibly new) mesh's layout
            graphdef, target = abstract_state(exp)
            state = manager.restore(start, args=ocp.args.StandardRestore(target))
        else:
            graphdef, state = init_state(exp)
        step_fn = compile_train_step(exp, graphdef, state)

    writer = MetricsWriter(workdir, start, tensorboard=config.log.tensorboard) \
        if jax.process_index() == 0 else None

    def log(step, kind, values):
        if writer is not None:
            writer.write(step, kind, values)

    def run_eval(step):
        metrics = evaluate.evaluate(graphdef, state["params"], eval_set, exp.spec,
                                    batch_size=cfg_eval.batch_size,
                                    max_pred_tokens=cfg_eval.max_pred_tokens,
                                    batch_sharding=eval_sharding)
        log(step, "eval", metrics)
        return metrics

    bar = tqdm(total=exp.total_steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not config.log.progress_bar or jax.process_index() != 0)
    last_eval = {}
    window_start = time.perf_counter()
    step = start
    try:
        with _Preemption() as preemption, jax.set_mesh(exp.mesh):
            while step < exp.total_steps:
                state = step_fn(state, world, train_key)
                step += 1
                bar.update(1)
                last = step == exp.total_steps
                if step % cfg_train.log_every_n_steps == 0 or last:
                    _check_finite(state, manager)
                    now = time.perf_counter()
                    train_metrics = _window_metrics(state, now - window_start)
                    window_start = now
                    log(step, "train", train_metrics)
                    bar.set_postfix(loss=f"{train_metrics['loss']:.3f}",
                                    acc=f"{last_eval.get('answer_acc', float('nan')):.3f}",
                                    tok_s=f"{train_metrics['tokens_per_s']:,.0f}")
                # Evaluate before checkpointing: a run resumed from step s has its records up
                # to s, the evaluation at s included.
                if step % cfg_eval.eval_every_n_steps == 0 or last:
                    _check_finite(state, manager)
                    last_eval = run_eval(step)
                    window_start = time.perf_counter()  # keeps eval time out of tokens/s
                if step % cfg_train.checkpoint_every_n_steps == 0 or last or preemption.requested:
                    _check_finite(state, manager)
                    manager.save(step, args=ocp.args.StandardSave(state))
                if preemption.requested:
                    manager.wait_until_finished()
                    bar.close()
                    print(f"Preempted (SIGTERM) at step {step}; checkpoint saved, resume with "
                          f"the same command.")
                    return {"preempted_at_step": step}
    finally:
        bar.close()
        manager.close()  # waits for a save in flight
        if writer is not None:
            writer.close()

    results = _results(config, workdir, step, model.count_params(state["params"]))
    if jax.process_index() == 0:
        _write_json(os.path.join(workdir, "results.json"), results)
    return results


def _results(config, workdir: str, step: int, n_params: int) -> dict:
    """Final results, from the run's metrics (so a run resumed after its end rebuilds them)."""
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    last = {kind: next((r for r in reversed(records) if r["kind"] == kind), {})
            for kind in ("train", "eval")}
    strip = ("step", "kind")
    return dict(run_name=config_lib.run_name(config), step=step, n_params=n_params,
                train={k: v for k, v in last["train"].items() if k not in strip},
                eval={k: v for k, v in last["eval"].items() if k not in strip})


def summary(results: dict, workdir: str) -> str:
    """A one-screen summary of a finished run."""
    lines = [f"run        {results['run_name']}", f"workdir    {workdir}",
             f"steps      {results['step']}", f"parameters {results['n_params']:,}"]
    for kind in ("train", "eval"):
        for name, value in results[kind].items():
            shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
            lines.append(f"{kind + '/' + name:<28s} {shown}")
    return "\n".join(lines)
