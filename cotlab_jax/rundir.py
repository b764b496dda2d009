"""Run directories: what a run writes (`config.json`, the frozen eval set, orbax checkpoints,
`results.json`, `failed.json`; metrics are `cotlab_jax.metrics`) and loading a run back.

A run directory is independent of the devices that wrote it: `load_run` restores a checkpoint
onto any mesh (by default one device), and a resumed run restores into its new mesh's layout.
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import zipfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cotlab_jax import cli_errors, data, experiment, sharding
from cotlab_jax import config as config_lib
from cotlab_jax.metrics import read_metrics

# Config fields that change the shapes or structure of the checkpointed state.
STATE_SHAPE_FIELDS = (
    "data.vocab_size",
    "model.num_hidden_layers",
    "model.hidden_size",
    "model.intermediate_size",
    "model.num_attention_heads",
    "model.num_key_value_heads",
    "model.head_dim",
    "model.tie_word_embeddings",
)


# Config fields a relaunch may change: they decide where and how often a run logs, evaluates,
# checkpoints and places its arrays, not its data, model or numbers. Any other change is refused
# unless asked for (`allow_config_change`).
RELAUNCH_FREE_FIELDS = (
    "train.log_every_n_steps",
    "train.checkpoint_every_n_steps",
    "train.keep_checkpoints",
    "eval.eval_every_n_steps",
    "eval.batch_size",
    "eval.analysis_batch_size",
    "model.remat_policy",
    "model.attention_impl",
)
RELAUNCH_FREE_GROUPS = ("log.", "mesh.", "sweep.")

DAMAGED_DIR = "damaged_checkpoints"


class RunError(cli_errors.CommandError):
    """A run cannot start or go on; the message says why in one line."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


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
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (ValueError, TypeError, AttributeError) as error:  # not JSON, or not an object
        raise RunError(f"{path} is damaged: it is not a JSON config ({error})") from None
    except OSError as error:
        raise RunError(f"cannot read {path}: {error.strerror}") from None


def changed_fields(saved: dict, current: dict) -> list[str]:
    """The flat config fields (dotted) whose values differ, less those a relaunch may change.
    A field only one side has (added to the lab after the run started) is not compared: its
    default keeps the old behaviour."""
    return sorted(
        name
        for name in saved.keys() & current.keys()
        if saved.get(name) != current.get(name)
        and name not in RELAUNCH_FREE_FIELDS
        and not name.startswith(RELAUNCH_FREE_GROUPS)
    )


def make_workdir(workdir: str) -> None:
    """Creates the run directory and checks that it is writable."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):  # unique: processes may probe at once
            pass
    except OSError as e:
        raise RunError(f"cannot write to workdir {workdir}: {e.strerror}") from None


def prepare_workdir(workdir: str, config, allow_config_change: bool = False) -> None:
    """Creates the run directory, or checks that a resumed run keeps the state's shapes (the
    mesh may change: the checkpoint is resharded on restore) and, unless
    `allow_config_change`, every field that decides its data, model or numbers."""
    make_workdir(workdir)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        saved, current = _flat(load_config(workdir)), _flat(json.loads(config.to_json()))
        differing = [
            f"{name} (checkpoint {saved.get(name)!r}, config {current.get(name)!r})"
            for name in STATE_SHAPE_FIELDS
            if saved.get(name) != current.get(name)
        ]
        if (saved.get("train.grad_clip_norm", 0) > 0) != (current["train.grad_clip_norm"] > 0):
            differing.append("train.grad_clip_norm (on/off changes the optimizer state)")
        if differing:
            raise RunError(
                f"{workdir} holds a run whose state has other shapes; differing "
                f"fields: {', '.join(differing)}. Use another --workdir."
            )
        changed = changed_fields(saved, current)
        if changed and not allow_config_change:
            shown = ", ".join(
                f"{name} ({saved.get(name)!r} -> {current.get(name)!r})" for name in changed
            )
            raise RunError(
                f"{workdir} holds a run of another config; changed fields: {shown}. "
                f"Relaunch with its config, use another --workdir, or pass "
                f"--allow_config_change to go on with the new values"
            )
    if jax.process_index() == 0:
        write_json(path, json.loads(config.to_json()))


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """The writer's manager (only the process holding the run's lock opens one): it removes
    the temporary directories of saves that a killed process left behind."""
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True
        ),
    )


def read_only_checkpoints(workdir: str) -> ocp.CheckpointManager:
    """A reader's manager: it creates, deletes and cleans up nothing, so it never touches a
    save in progress (orbax lists only finalized steps, not their temporary directories)."""
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(path):
        raise RunError(f"{workdir} has no checkpoint")
    return ocp.CheckpointManager(
        path,
        options=ocp.CheckpointManagerOptions(
            read_only=True,
            create=False,
            cleanup_tmp_directories=False,
            save_interval_steps=0,
            enable_async_checkpointing=False,
        ),
    )


def latest_checkpoint(workdir: str, keep: int | None = None) -> int | None:
    """The step of a run directory's latest checkpoint; None if it has none. (`keep` is
    unused: a reader deletes nothing.)"""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    with read_only_checkpoints(workdir) as manager:
        return manager.latest_step()


class DamagedCheckpointError(RunError):
    """A checkpoint cannot be restored (a truncated or missing file)."""


def restore_state(manager: ocp.CheckpointManager, step: int, exp: experiment.Experiment):
    """(graphdef, the train state of checkpoint `step`) laid out over `exp.mesh`, whatever mesh
    wrote it: orbax reads each array into the target's sharding."""
    graphdef, target = experiment.abstract_state(exp)
    _drop_abandoned_read_errors()
    try:
        return graphdef, manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as error:  # orbax and TensorStore report damage with many exception types
        lines = str(error).strip().splitlines()
        # TensorStore appends its JSON specs to the message: the reason comes before them.
        reason = (lines[0] if lines else "").split(" [tensorstore_spec")[0]
        raise DamagedCheckpointError(
            f"checkpoint step {step} in {manager.directory} is damaged or incomplete "
            f"({type(error).__name__}: {reason})"
        ) from None


def _drop_abandoned_read_errors() -> None:
    """When a restore fails, the TensorStore reads still in flight call back into orbax's event
    loop, which is closed by then, and each prints a traceback ("Event loop is closed"). Those
    errors, and only those, are dropped (installed once, before the first restore)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_errors", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook


def restore_newest_valid(manager: ocp.CheckpointManager, workdir: str, exp: experiment.Experiment):
    """(step, graphdef, state) of the newest checkpoint that restores; (None, None, None) if
    none is left. Damaged newer ones are moved to `workdir/damaged_checkpoints` (kept for
    inspection, out of the way of the saves that replace them) with a warning naming the steps
    to be recomputed."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            graphdef, state = restore_state(manager, step, exp)
        except DamagedCheckpointError as error:
            older = [s for s in manager.all_steps() if s < step]
            start = max(older, default=0)
            warn(
                f"{error}; going on from {f'step {start}' if start else 'the start'}: steps "
                f"{start + 1}-{step} are recomputed (the damaged checkpoint is moved to "
                f"{os.path.join(workdir, DAMAGED_DIR)})"
            )
            if jax.process_index() == 0:
                target = os.path.join(workdir, DAMAGED_DIR, f"{step}-{os.getpid()}")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.move(os.path.join(str(manager.directory), str(step)), target)
            manager.reload()
            continue
        return step, graphdef, state
    return None, None, None


def frozen_eval_set(workdir: str, exp: experiment.Experiment) -> dict[str, np.ndarray]:
    """The frozen eval set: made once from `seed + 1000`, then reloaded from the run directory."""
    path = os.path.join(workdir, "eval_set.npz")
    if os.path.exists(path):
        return read_eval_set(path, exp.spec)
    keys = data.root_keys(exp.config.seed)
    world = data.make_world(keys["world"], exp.spec)  # on this process's default device
    eval_set = data.build_eval_set(world, keys["eval"], exp.spec, exp.config.eval.n_eval_tasks)
    if jax.process_index() == 0:
        data.save_eval_set(path, eval_set, exp.spec)
    return eval_set


def read_eval_set(path: str, spec: data.TaskSpec) -> dict[str, np.ndarray]:
    """A run's frozen eval set, telling a damaged file from one made for another task spec."""
    try:
        data.load_eval_set(path)
    except (ValueError, KeyError, EOFError, OSError, zipfile.BadZipFile) as error:
        lines = str(error).strip().splitlines()
        raise RunError(
            f"{path} is damaged or not an eval set ({type(error).__name__}: "
            f"{lines[0] if lines else ''})"
        ) from None
    try:
        return data.load_eval_set(path, spec)
    except ValueError as e:
        raise RunError(f"{e}; the task config changed since this run started") from None


@dataclasses.dataclass
class Run:
    """A trained run loaded back: what evaluation and export need."""

    config: ml_collections.ConfigDict
    spec: data.TaskSpec
    graphdef: object
    params: object
    step: int
    world: dict
    workdir: str


def load_run(
    workdir: str, step: int | str = "latest", mesh: jax.sharding.Mesh | None = None
) -> Run:
    """The config, model and parameters of a run's checkpoint (`latest` or a step number),
    placed on `mesh` (default: one local device; any mesh works, whatever trained the run)."""
    config = load_config(workdir)
    if mesh is None:
        mesh = sharding.make_mesh({}, devices=jax.local_devices()[:1])
    try:
        exp = experiment.setup(config, mesh)
    except (AttributeError, KeyError, TypeError) as error:  # a JSON object, not a run's config
        raise RunError(
            f"{os.path.join(workdir, 'config.json')} is damaged: it is not a run's "
            f"config ({type(error).__name__}: {error})"
        ) from None
    with read_only_checkpoints(workdir) as manager:
        steps = manager.all_steps()
        if not steps:
            raise RunError(f"{workdir} has no checkpoint")
        if step == "latest":
            step = max(steps)
        elif int(step) not in steps:
            raise RunError(f"{workdir} has no checkpoint at step {step}; it has {sorted(steps)}")
        graphdef, state = restore_state(manager, int(step), exp)
    world = data.make_world(data.root_keys(config.seed)["world"], exp.spec)
    return Run(
        config=config,
        spec=exp.spec,
        graphdef=graphdef,
        params=state["params"],
        step=int(step),
        world=world,
        workdir=workdir,
    )


def parse_step(step: str) -> int | str:
    """A command line's --step: `latest` or a step number, as `load_run` takes it."""
    if step == "latest":
        return step
    if not step.isdigit():
        raise RunError(f"--step={step!r}: expected `latest` or a non-negative integer")
    return int(step)


def write_results(config, workdir: str, step: int, n_params: int) -> dict:
    """The final results (written to `results.json`), from the run's metrics, so a run resumed
    after its end rebuilds them."""
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    last = {
        kind: next((r for r in reversed(records) if r["kind"] == kind), {})
        for kind in ("train", "eval")
    }
    strip = ("step", "kind")
    results = dict(
        run_name=config_lib.run_name(config),
        step=step,
        n_params=n_params,
        train={k: v for k, v in last["train"].items() if k not in strip},
        eval={k: v for k, v in last["eval"].items() if k not in strip},
    )
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "results.json"), results)
    return results


def write_failure(workdir: str, error: str, step: int) -> None:
    """`failed.json`: why the run stopped (a relaunched sweep skips it until it is deleted)."""
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "failed.json"), dict(error=error, step=step))
