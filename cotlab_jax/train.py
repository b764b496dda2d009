"""The training loop: one run, or sweep members packed into one program, stepped on device;
periodic logging, evaluation on the frozen eval set and orbax checkpoints on the host; exact
resumption (on any mesh) and a clean stop on SIGTERM or a non-finite loss.

The jittable parts are `cotlab_jax.experiment` (one run) and `cotlab_jax.packed` (a pack); the
run directory is `cotlab_jax.rundir`.
"""

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from tqdm import tqdm

from cotlab_jax import analysis, data, evaluate, experiment, model, packed, rundir, runlock
from cotlab_jax import config as config_lib
from cotlab_jax.metrics import MetricsWriteError, MetricsWriter


class NonFiniteLossError(rundir.RunError):
    pass


class WriteFailedError(rundir.RunError):
    """A checkpoint or metrics write failed (a full disk): the run stopped; what was written
    before stays intact and a relaunch goes on from the last complete checkpoint."""


def _write_failed(what: str, step: int, error: OSError, manager) -> WriteFailedError:
    why = (
        "the disk is full"
        if error.errno == errno.ENOSPC
        else (error.strerror or str(error).splitlines()[0])
    )
    kept = manager.latest_step()
    return WriteFailedError(
        f"{what} at step {step} failed: {why}. Stopped; the run is intact up to "
        f"{'its start' if kept is None else f'checkpoint {kept}'}: free space and relaunch the "
        f"same command to go on from there"
    )


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

    def __init__(self, exp: experiment.Experiment, workdir: str):
        self.exp, self.workdir = exp, workdir
        self.eval_set = rundir.frozen_eval_set(workdir, exp)
        self.manager = rundir.checkpoint_manager(workdir, exp.config.train.keep_checkpoints)
        # The newest checkpoint that restores (damaged newer ones are set aside, with a warning);
        # None: the run starts afresh. A step-0 checkpoint holds the initial state, a function
        # of the seed that the program makes again, so only later ones are used.
        with jax.set_mesh(exp.mesh):
            self.checkpoint, graphdef, state = rundir.restore_newest_valid(
                self.manager, workdir, exp
            )
        self.restored = (graphdef, state) if self.checkpoint else None
        self.writer = None
        self.failure = None  # the message, once the state went non-finite
        self.failed_step = None
        self.world = None  # made when the analyses first need it
        self.last_acc = "nan"  # for the progress bar

    @property
    def start(self) -> int:
        """The step this run goes on from."""
        return self.checkpoint or 0

    @property
    def fresh(self) -> bool:
        """Nothing of this run is kept: it evaluates and checkpoints its initial state first."""
        return self.checkpoint is None

    def open_metrics(self) -> None:
        if jax.process_index() == 0:
            self.writer = MetricsWriter(
                self.workdir, self.checkpoint, tensorboard=self.exp.config.log.tensorboard
            )
        if self.fresh:  # a property of the task distribution, known before training
            coverage = analysis.eval_set_coverage(self.eval_set, self.exp.spec)
            self.log(0, "data", dict(token_coverage=coverage))

    def log(self, step: int, kind: str, values: dict) -> None:
        if self.writer is not None:
            try:
                self.writer.write(step, kind, values)
            except MetricsWriteError as error:
                raise _write_failed(
                    f"writing {self.writer.path}", step, error, self.manager
                ) from None

    def save(self, step: int, state) -> None:
        try:
            saved = self.manager.save(step, args=ocp.args.StandardSave(state))
        except OSError as error:
            raise _write_failed(
                f"saving the checkpoint of {self.workdir}", step, error, self.manager
            ) from None
        if not saved:  # orbax skips a step at or before its newest checkpoint
            raise rundir.RunError(
                f"the checkpoint of step {step} in {self.workdir} was not saved: orbax "
                f"declined it (checkpoints there: {sorted(self.manager.all_steps())})"
            )

    def evaluate(self, graphdef, params, step: int, final: bool) -> None:
        """Logs the evaluation on the frozen eval set (at the end also over example counts),
        and the analyses if the config asks for them."""
        cfg, spec = self.exp.config, self.exp.spec
        sharding = jax.sharding.NamedSharding(self.exp.mesh, jax.P(("data", "fsdp")))
        options = dict(
            batch_size=cfg.eval.batch_size,
            max_pred_tokens=cfg.eval.max_pred_tokens,
            answer_rule=cfg.eval.answer_rule,
            batch_sharding=sharding,
        )
        metrics = evaluate.evaluate(graphdef, params, self.eval_set, spec, **options)
        self.log(step, "eval", metrics)
        self.last_acc = f"{metrics.get('answer_acc', float('nan')):.3f}"
        counts = config_lib.parse_example_counts(cfg.eval.example_counts, spec.K)
        if final and counts:
            by_k = evaluate.evaluate_over_k(
                graphdef, params, self.eval_set, spec, example_counts=counts, **options
            )
            self.log(step, "eval_by_k", evaluate.flatten_over_k(by_k))
        if cfg.eval.analyses:
            self.log(
                step, "analysis", self.analyses(graphdef, params, final, options["batch_sharding"])
            )

    def analyses(self, graphdef, params, final: bool, batch_sharding) -> dict:
        """The analyses of `cotlab_jax.analysis` (and, at the end, the query's attention
        figure in the run directory)."""
        cfg, spec = self.exp.config, self.exp.spec
        if self.world is None:
            self.world = data.make_world(data.root_keys(cfg.seed)["world"], spec)
        metrics = analysis.dag_recovery(
            graphdef,
            params,
            self.eval_set,
            spec,
            batch_size=cfg.eval.analysis_batch_size,
            n_tasks=cfg.eval.analysis_tasks,
            batch_sharding=batch_sharding,
        )
        metrics.update(analysis.embedding_metrics(params, self.world, spec))
        if final and jax.process_index() == 0 and not spec.prompt_strategy.startswith("standard"):
            first_task = {name: value[:1] for name, value in self.eval_set.items()}
            analysis.plot_query_attention(
                graphdef,
                params,
                first_task,
                spec,
                os.path.join(self.workdir, "query_attention.png"),
            )
        return metrics

    def check_finite(self, nonfinite_step) -> bool:
        """False (and the failure recorded in `failed.json`) once the state went non-finite."""
        bad = int(nonfinite_step)
        if self.failure is None and bad >= 0:
            latest = self.manager.latest_step()
            kept = (
                f"the last good checkpoint is step {latest}"
                if latest is not None
                else "no checkpoint was written"
            )
            self.failure = (
                f"the training loss (or the updated parameters) became non-finite at step "
                f"{bad + 1}; stopping ({kept}). Try a lower train.lr, or set "
                f"train.grad_clip_norm."
            )
            self.failed_step = bad + 1
            rundir.write_failure(self.workdir, self.failure, self.failed_step)
        return self.failure is None

    def close(self) -> None:
        try:
            self.manager.close()  # waits for a save in flight
        except OSError as error:  # the save in flight failed
            raise _write_failed(
                f"saving the checkpoint of {self.workdir}", "the end", error, self.manager
            ) from None
        finally:
            if self.writer is not None:
                self.writer.close()


# Builds one run's step: (exp, graphdef, state, resumed) -> (state, step), step(state, world,
# train_key) -> state. Another builder (distillation's) may also replace a fresh state's values.
StepBuilder = Callable[[experiment.Experiment, object, dict, bool], tuple[dict, Callable]]


def train_step_builder(exp: experiment.Experiment, graphdef, state, resumed: bool):
    del resumed
    return state, experiment.compile_train_step(exp, graphdef, state)


def _single_program(member: _Member, build_step: StepBuilder) -> experiment.Program:
    exp, config = member.exp, member.exp.config
    # Global (replicated) copies, made on every process alike, as the train step's inputs.
    replicated = jax.sharding.NamedSharding(exp.mesh, jax.P())
    world, train_key = jax.jit(
        lambda: (
            data.make_world(data.root_keys(config.seed)["world"], exp.spec),
            data.root_keys(config.seed)["train"],
        ),
        out_shardings=replicated,
    )()
    with jax.set_mesh(exp.mesh):
        if member.start:  # restored straight into this mesh's layout, whatever mesh saved it
            (graphdef, state), member.restored = member.restored, None
        else:
            graphdef, state = experiment.init_state(exp)
        state, step_fn = build_step(exp, graphdef, state, member.start > 0)
    return experiment.Program(
        graphdef=graphdef,
        state=state,
        step=lambda state: step_fn(state, world, train_key),
        member_state=lambda state, i: state,
        packed=False,
    )


def _window_metrics(window, seconds: float) -> dict:
    steps = max(int(window["steps"]), 1)
    metrics = dict(
        loss=float(window["loss_sum"]) / steps,
        n_cot=int(window["n_cot"]),
        n_direct=int(window["n_direct"]),
        grad_norm=float(window["grad_norm"]),
        tokens_per_s=int(window["tokens"]) / max(seconds, 1e-9),
        step_time_s=seconds / steps,
    )
    # The loss terms of `experiment.extra_window_metrics`, over the steps that had them.
    for name in window:
        if name.endswith("_sum") and name != "loss_sum":
            term, count = name.removesuffix("_sum"), int(window[name.replace("_sum", "_steps")])
            metrics[term] = float(window[name]) / count if count else float("nan")
    return metrics


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    build_step: StepBuilder = train_step_builder,
    allow_config_change: bool = False,
) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the final results (also results.json).
    `build_step` makes its step (default: the train step; distillation passes its own);
    `allow_config_change`: see `rundir.prepare_workdir`."""
    (results,) = train_members([(config, workdir)], build_step, allow_config_change)
    if "error" in results:
        raise NonFiniteLossError(results["error"])
    return results


def due_actions(step: int, total_steps: int, periods: dict[str, int]) -> set[str]:
    """The periodic actions (names of `periods`: action -> every n steps) due after `step`:
    each at multiples of its period, and all of them after the last step."""
    return {action for action, every in periods.items() if step % every == 0 or step == total_steps}


def train_members(
    runs: list[tuple[ml_collections.ConfigDict, str]],
    build_step: StepBuilder = train_step_builder,
    allow_config_change: bool = False,
) -> list[dict]:
    """Trains (or resumes) runs `(config, workdir)` together: one run alone, or sweep members
    packed into one vmapped program (`cotlab_jax.packed`; their configs must share what
    `packed.pack_key` names, and their checkpoints the same step). Each keeps its own run
    directory, exactly as if trained alone. Returns each run's results; a run whose loss became
    non-finite stops there and gets `{"error", "step"}`, the others go on. `build_step` makes
    a single run's step (a pack always runs the train step). Each run directory is locked
    (`cotlab_jax.runlock`) while it trains; a full disk stops with `WriteFailedError`.
    """
    exps = [experiment.setup(config) for config, _ in runs]
    with contextlib.ExitStack() as locks:
        for _, workdir in runs:
            rundir.make_workdir(workdir)
            if jax.process_index() == 0:
                try:
                    locks.enter_context(runlock.RunLock(workdir))
                except runlock.LockedError as error:
                    raise rundir.RunError(str(error)) from None
        return _train_locked(runs, exps, build_step, allow_config_change)


def _train_locked(runs, exps, build_step: StepBuilder, allow_config_change: bool) -> list[dict]:
    for config, workdir in runs:
        rundir.prepare_workdir(workdir, config, allow_config_change)
    members = [_Member(exp, workdir) for exp, (_, workdir) in zip(exps, runs, strict=True)]
    start = _align_pack(members)
    exp = exps[0]  # the schedule and the mesh are shared
    if len(members) > 1 and build_step is not train_step_builder:
        raise ValueError("a pack of runs trains with the train step only")
    if len(members) == 1:
        program = _single_program(members[0], build_step)
    else:
        program = packed.program(exps, [m.manager for m in members], start)
    periods = dict(
        log=exp.config.train.log_every_n_steps,
        eval=exp.config.eval.eval_every_n_steps,
        save=exp.config.train.checkpoint_every_n_steps,
    )
    for m in members:
        m.open_metrics()
    fresh = [i for i, m in enumerate(members) if m.fresh]
    bar = tqdm(
        total=exp.total_steps,
        initial=start,
        unit="step",
        dynamic_ncols=True,
        disable=not exp.config.log.progress_bar or jax.process_index() != 0,
    )
    state, step = program.state, start
    try:
        with _Preemption() as preemption, jax.set_mesh(exp.mesh):
            # As the reference, a fresh run is evaluated and checkpointed at step 0, before its
            # first step (a relaunch after that checkpoint keeps the step-0 records).
            if fresh:
                member_states = {i: program.member_state(state, i) for i in fresh}
                _evaluate_and_save(members, member_states, program.graphdef, 0, {"eval", "save"})
            window_start = time.perf_counter()
            while step < exp.total_steps and any(m.failure is None for m in members):
                state = program.step(state)
                step += 1
                bar.update(1)
                due = due_actions(step, exp.total_steps, periods)
                # Read once: a SIGTERM handled later in this iteration (at the blocking reads
                # below) waits for the next step, so the message below never goes unsaved.
                preempted = preemption.requested
                if preempted:
                    due.add("save")
                if not due:
                    continue
                host = jax.device_get(
                    dict(window=state["window"], nonfinite_step=state["nonfinite_step"])
                )
                own = [
                    jax.tree.map(lambda x, i=i: x[i], host) if program.packed else host
                    for i in range(len(members))
                ]
                active = [
                    i for i, m in enumerate(members) if m.check_finite(own[i]["nonfinite_step"])
                ]
                if "log" in due:
                    window_start = _log_windows(members, active, own, step, window_start, bar)
                if due & {"eval", "save"}:
                    member_states = {i: program.member_state(state, i) for i in active}
                    final = step == exp.total_steps
                    _evaluate_and_save(members, member_states, program.graphdef, step, due, final)
                    window_start = time.perf_counter()  # keeps eval time out of tokens/s
                if preempted:
                    for m in members:
                        m.manager.wait_until_finished()
                    bar.close()
                    print(
                        f"Preempted (SIGTERM) at step {step}; checkpoint saved, resume with "
                        f"the same command."
                    )
                    return [{"preempted_at_step": step} for _ in members]
    finally:
        bar.close()
        for m in members:
            m.close()

    n_params = model.count_params(program.member_state(state, 0)["params"])
    return [
        dict(error=m.failure, step=m.failed_step)
        if m.failure is not None
        else rundir.write_results(m.exp.config, m.workdir, step, n_params)
        for m in members
    ]


def _align_pack(members: list[_Member]) -> int:
    """The step the members go on from together: the newest step that every one of them has
    a checkpoint of, no later than any member's newest valid one. Members can stand at other
    steps when a damaged checkpoint was set aside; one ahead removes its newer checkpoints
    (the pack recomputes them, with the same numbers), with a warning naming the steps."""
    if len(members) == 1:
        return members[0].start
    newest = min(m.start for m in members)
    shared = set.intersection(*(set(m.manager.all_steps()) for m in members))
    start = max((s for s in shared if s <= newest), default=0)
    for m in members:
        ahead = sorted(s for s in m.manager.all_steps() if s > start)
        if ahead:
            rundir.warn(
                f"{m.workdir}: going back to step {start}, the newest checkpoint that every "
                f"member of its pack has: steps {start + 1}-{m.start} are recomputed (its "
                f"newer checkpoints, {', '.join(map(str, ahead))}, are removed)"
            )
            for step in ahead:
                m.manager.delete(step)
        m.checkpoint = start if start in m.manager.all_steps() else None
        m.restored = None  # the pack restores its stacked state itself
    return start


def _evaluate_and_save(
    members: list[_Member],
    member_states: dict,
    graphdef,
    step: int,
    due: set[str],
    final: bool = False,
) -> None:
    """The due evaluations and checkpoints of step `step` for the members in `member_states`
    (index -> its state). Evaluations come first: a run resumed from checkpoint s has its
    records up to s, the evaluation at s included."""
    if "eval" in due:
        for i, member_state in member_states.items():
            members[i].evaluate(graphdef, member_state["params"], step, final=final)
    if "save" in due:
        for i, member_state in member_states.items():
            members[i].save(step, member_state)


def _log_windows(
    members: list[_Member], active: list[int], own: list[dict], step: int, window_start: float, bar
) -> float:
    """Logs each active member's training window; a pack's progress bar shows every member's
    loss and accuracy ("a/b/..."). Returns the next window's start time."""
    now = time.perf_counter()
    window = {i: _window_metrics(own[i]["window"], now - window_start) for i in active}
    for i in active:
        members[i].log(step, "train", window[i])
    if active:
        bar.set_postfix(
            loss="/".join(f"{window[i]['loss']:.3f}" for i in active),
            acc="/".join(members[i].last_acc for i in active),
            tok_s=f"{sum(window[i]['tokens_per_s'] for i in active):,.0f}",
        )
    return now


def summary(results: dict, workdir: str) -> str:
    """A one-screen summary of a finished run."""
    lines = [
        f"run        {results['run_name']}",
        f"workdir    {workdir}",
        f"steps      {results['step']}",
        f"parameters {results['n_params']:,}",
    ]
    for kind in ("train", "eval"):
        for name, value in results[kind].items():
            shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
            lines.append(f"{kind + '/' + name:<28s} {shown}")
    return "\n".join(lines)
