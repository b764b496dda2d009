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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from cotlab_jax import analysis, data, evaluate, model, sharding
from cotlab_jax import config as config_lib
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
    # As the reference: with special tokens the embedding has padding_idx = the pad id (V-1).
    padding_idx = spec.token_id("pad") if spec.special_tokens else None
    model_config = model.LlamaConfig.from_config(config.model, config.data.vocab_size, padding_idx)
    config_lib.validate_train(config.train)
    config_lib.validate_eval(config.eval)
    config_lib.example_counts(config.eval, spec.K)
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
    batch_fields = ["train.batch_size", "eval.batch_size"]
    if config.eval.analyses:
        batch_fields.append("eval.analysis_batch_size")
    for field in batch_fields:
        group, name = field.split(".")
        if config[group][name] % batch_shards:
            raise config_lib.ConfigError(
                f"config.{field}={config[group][name]} is invalid: expected a multiple of the "
                f"mesh's data x fsdp size, {batch_shards}")
    return Experiment(config=config, spec=spec, model_config=model_config,
                      total_steps=config.train.n_tasks // config.train.batch_size, mesh=mesh)


# The optimizer's numbers. A pack of sweep members passes them traced, one per member, so members
# that differ only in these share one program; the rest of `config.train` shapes the program.
OPTIMIZER_HPARAMS = ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip_norm")


def optimizer_hparams(train_cfg) -> dict[str, float]:
    return {name: float(train_cfg[name]) for name in OPTIMIZER_HPARAMS}


def make_optimizer(train_cfg, total_steps: int,
                   hparams: dict | None = None) -> optax.GradientTransformation:
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
    optimizer = optax.adamw(schedule, b1=h["b1"], b2=h["b2"], eps=h["eps"],
                            weight_decay=h["weight_decay"])
    if train_cfg.grad_clip_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(h["grad_clip_norm"]), optimizer)
    return optimizer


def empty_window():
    return dict(loss_sum=jnp.float32(0), steps=jnp.int32(0), n_cot=jnp.int32(0),
                n_direct=jnp.int32(0), tokens=jnp.int32(0), grad_norm=jnp.float32(0))


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
    return dict(step=jnp.int32(0), params=params, opt_state=opt_state, window=empty_window(),
                nonfinite_step=jnp.int32(-1))


def state_layout(abstract, mesh: jax.sharding.Mesh, leading_names: tuple[str, ...] = ()):
    """`abstract` (a train state of `jax.ShapeDtypeStruct`s) with its shardings over `mesh`:
    parameters by their logical axes, Adam moments alike, per-run scalars replicated.
    `leading_names` name axes stacked in front of every leaf (("replica",) for a pack)."""
    lead = tuple(abstract["step"].shape)
    small = jax.sharding.NamedSharding(mesh, sharding.logical_to_mesh_spec(
        leading_names, lead, dict(mesh.shape), sharding.current_rules()))
    with jax.set_mesh(mesh):
        params = sharding.state_shardings(abstract["params"], mesh, leading_names)
    shardings = dict(
        step=small, params=params,
        opt_state=_opt_state_shardings(abstract["opt_state"], abstract["params"], params, small),
        window=jax.tree.map(lambda _: small, abstract["window"]),
        nonfinite_step=small)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


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
        model_key(exp.config.seed))
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


def train_step(state, batch, *, graphdef, exp: Experiment, hparams: dict | None = None):
    """One AdamW step on `batch` (`hparams`: see `make_optimizer`)."""
    optimizer = make_optimizer(exp.config.train, exp.total_steps, hparams)
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


def write_json(path: str, value) -> None:
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
        write_json(path, json.loads(config.to_json()))


def _checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True))


def latest_checkpoint(workdir: str, keep: int) -> int | None:
    """The step of a run directory's latest checkpoint; None if it has none."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    with _checkpoint_manager(workdir, keep) as manager:
        return manager.latest_step()


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


class _Member:
    """One run of those trained together: its experiment, run directory, frozen eval set,
    checkpoints, metrics, and whether it has failed."""

    def __init__(self, exp: Experiment, workdir: str):
        self.exp, self.workdir = exp, workdir
        self.eval_set = _eval_set(workdir, exp)
        self.manager = _checkpoint_manager(workdir, exp.config.train.keep_checkpoints)
        self.start = self.manager.latest_step() or 0
        self.writer = None
        self.failure = None  # the message, once the state went non-finite
        self.failed_step = None
        self.world = None  # made when the analyses first need it

    def open_metrics(self) -> None:
        if jax.process_index() == 0:
            self.writer = MetricsWriter(self.workdir, self.start,
                                        tensorboard=self.exp.config.log.tensorboard)

    def log(self, step: int, kind: str, values: dict) -> None:
        if self.writer is not None:
            self.writer.write(step, kind, values)

    def analyses(self, graphdef, params, final: bool, batch_sharding) -> dict:
        """The analyses of `cotlab_jax.analysis` (and, at the end, the query's attention
        figure in the run directory)."""
        cfg, spec = self.exp.config, self.exp.spec
        if self.world is None:
            self.world = data.make_world(data.root_keys(cfg.seed)["world"], spec)
        metrics = analysis.dag_recovery(graphdef, params, self.eval_set, spec,
                                        batch_size=cfg.eval.analysis_batch_size,
                                        n_tasks=cfg.eval.analysis_tasks,
                                        batch_sharding=batch_sharding)
        metrics.update(analysis.embedding_metrics(params, self.world, spec))
        if final and jax.process_index() == 0 and not spec.prompt_strategy.startswith(
                "standard"):
            first_task = {name: value[:1] for name, value in self.eval_set.items()}
            analysis.plot_query_attention(graphdef, params, first_task, spec,
                                          os.path.join(self.workdir, "query_attention.png"))
        return metrics

    def check_finite(self, nonfinite_step) -> bool:
        """False (and the failure recorded in `failed.json`) once the state went non-finite."""
        bad = int(nonfinite_step)
        if self.failure is None and bad >= 0:
            latest = self.manager.latest_step()
            kept = f"the last good checkpoint is step {latest}" if latest is not None else \
                "no checkpoint was written"
            self.failure = (
                f"the training loss (or the updated parameters) became non-finite at step "
                f"{bad + 1}; stopping ({kept}). Try a lower train.lr, or set "
                f"train.grad_clip_norm.")
            self.failed_step = bad + 1
            if jax.process_index() == 0:
                write_json(os.path.join(self.workdir, "failed.json"),
                            dict(error=self.failure, step=self.failed_step))
        return self.failure is None

    def close(self) -> None:
        self.manager.close()  # waits for a save in flight
        if self.writer is not None:
            self.writer.close()


@dataclasses.dataclass
class Program:
    """The jitted training of one or more members: the (possibly stacked) state, one step, and
    each member's own state in its single-run layout (what is evaluated and checkpointed)."""

    graphdef: object
    state: dict
    step: Callable[[dict], dict]
    member_state: Callable[[dict, int], dict]
    packed: bool


def _single_program(member: _Member) -> Program:
    exp, config = member.exp, member.exp.config
    # Global (replicated) copies, made on every process alike, as the train step's inputs.
    replicated = jax.sharding.NamedSharding(exp.mesh, jax.P())
    world, train_key = jax.jit(
        lambda: (data.make_world(data.root_keys(config.seed)["world"], exp.spec),
                 data.root_keys(config.seed)["train"]), out_shardings=replicated)()
    with jax.set_mesh(exp.mesh):
        if member.start:  # restored straight into its (possibly new) mesh's layout
            graphdef, target = abstract_state(exp)
            state = member.manager.restore(member.start, args=ocp.args.StandardRestore(target))
        else:
            graphdef, state = init_state(exp)
        step_fn = compile_train_step(exp, graphdef, state)
    return Program(graphdef=graphdef, state=state,
                   step=lambda state: step_fn(state, world, train_key),
                   member_state=lambda state, i: state, packed=False)


def _window_metrics(window, seconds: float) -> dict:
    steps = max(int(window["steps"]), 1)
    return dict(loss=float(window["loss_sum"]) / steps, n_cot=int(window["n_cot"]),
                n_direct=int(window["n_direct"]), grad_norm=float(window["grad_norm"]),
                tokens_per_s=int(window["tokens"]) / max(seconds, 1e-9),
                step_time_s=seconds / steps)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the final results (also results.json)."""
    (results,) = train_members([(config, workdir)])
    if "error" in results:
        raise NonFiniteLossError(results["error"])
    return results


def train_members(runs: list[tuple[ml_collections.ConfigDict, str]]) -> list[dict]:
    """Trains (or resumes) runs `(config, workdir)` together: one run alone, or sweep members
    packed into one vmapped program (`cotlab_jax.packed`; their configs must share what
    `packed.pack_key` names, and their checkpoints the same step). Each keeps its own run
    directory, exactly as if trained alone. Returns each run's results; a run whose loss became
    non-finite stops there and gets `{"error", "step"}`, the others go on."""
    exps = [setup(config) for config, _ in runs]
    for config, workdir in runs:
        _prepare_workdir(workdir, config)
    members = [_Member(exp, workdir) for exp, (_, workdir) in zip(exps, runs, strict=True)]
    starts = sorted({m.start for m in members})
    if len(starts) > 1:
        raise RunError(f"members packed together must resume from one step; their checkpoints "
                       f"are at steps {starts}")
    start = starts[0]
    exp = exps[0]  # the schedule and the mesh are shared
    cfg_train, cfg_eval = exp.config.train, exp.config.eval
    if len(members) == 1:
        program = _single_program(members[0])
    else:
        from cotlab_jax import packed  # it builds on this module

        program = packed.program(exps, [m.manager for m in members], start)
    state = program.state
    for m in members:
        m.open_metrics()
        if start == 0:  # a property of the task distribution, known before training
            coverage = analysis.eval_set_coverage(m.eval_set, m.exp.spec)
            m.log(0, "data", dict(token_coverage=coverage))
    eval_sharding = jax.sharding.NamedSharding(exp.mesh, jax.P(("data", "fsdp")))

    def run_eval(m: _Member, params, step: int, final: bool) -> dict:
        options = dict(batch_size=cfg_eval.batch_size, max_pred_tokens=cfg_eval.max_pred_tokens,
                       batch_sharding=eval_sharding)
        metrics = evaluate.evaluate(program.graphdef, params, m.eval_set, m.exp.spec, **options)
        m.log(step, "eval", metrics)
        counts = config_lib.example_counts(cfg_eval, m.exp.spec.K)
        if final and counts:
            by_k = evaluate.evaluate_over_k(program.graphdef, params, m.eval_set, m.exp.spec,
                                            example_counts=counts, **options)
            m.log(step, "eval_by_k", evaluate.flatten_over_k(by_k))
        if cfg_eval.analyses:
            m.log(step, "analysis", m.analyses(program.graphdef, params, final, eval_sharding))
        return metrics

    bar = tqdm(total=exp.total_steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not exp.config.log.progress_bar or jax.process_index() != 0)
    last_acc = ["nan"] * len(members)  # per member, for the progress bar
    window_start = time.perf_counter()
    step = start
    try:
        with _Preemption() as preemption, jax.set_mesh(exp.mesh):
            while step < exp.total_steps and any(m.failure is None for m in members):
                state = program.step(state)
                step += 1
                bar.update(1)
                last = step == exp.total_steps
                log_now = step % cfg_train.log_every_n_steps == 0 or last
                eval_now = step % cfg_eval.eval_every_n_steps == 0 or last
                save_now = (step % cfg_train.checkpoint_every_n_steps == 0 or last
                            or preemption.requested)
                if not (log_now or eval_now or save_now):
                    continue
                host = jax.device_get(dict(window=state["window"],
                                           nonfinite_step=state["nonfinite_step"]))
                own = [jax.tree.map(lambda x, i=i: x[i], host) if program.packed else host
                       for i in range(len(members))]
                active = [i for i, m in enumerate(members)
                          if m.check_finite(own[i]["nonfinite_step"])]
                if log_now:
                    now = time.perf_counter()
                    window = {i: _window_metrics(own[i]["window"], now - window_start)
                              for i in active}
                    for i in active:
                        members[i].log(step, "train", window[i])
                    window_start = now
                    if active:  # a pack shows every member's loss and accuracy: "a/b/..."
                        bar.set_postfix(
                            loss="/".join(f"{window[i]['loss']:.3f}" for i in active),
                            acc="/".join(last_acc[i] for i in active),
                            tok_s=f"{sum(window[i]['tokens_per_s'] for i in active):,.0f}")
                member_states = {i: program.member_state(state, i) for i in active} \
                    if eval_now or save_now else {}
                # Evaluate before checkpointing: a run resumed from step s has its records up
                # to s, the evaluation at s included.
                if eval_now:
                    for i in active:
                        metrics = run_eval(members[i], member_states[i]["params"], step, last)
                        last_acc[i] = f"{metrics.get('answer_acc', float('nan')):.3f}"
                    window_start = time.perf_counter()  # keeps eval time out of tokens/s
                if save_now:
                    for i in active:
                        members[i].manager.save(step, args=ocp.args.StandardSave(member_states[i]))
                if preemption.requested:
                    for m in members:
                        m.manager.wait_until_finished()
                    bar.close()
                    print(f"Preempted (SIGTERM) at step {step}; checkpoint saved, resume with "
                          f"the same command.")
                    return [{"preempted_at_step": step} for _ in members]
    finally:
        bar.close()
        for m in members:
            m.close()

    n_params = model.count_params(program.member_state(state, 0)["params"])
    results = []
    for m in members:
        if m.failure is not None:
            results.append(dict(error=m.failure, step=m.failed_step))
            continue
        result = _results(m.exp.config, m.workdir, step, n_params)
        if jax.process_index() == 0:
            write_json(os.path.join(m.workdir, "results.json"), result)
        results.append(result)
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
