"""Run directories: what a run writes (`config.json`, the frozen eval set, orbax checkpoints,
`results.json`, `failed.json`; metrics are `cotlab_jax.metrics`) and loading a run back.

A run directory is independent of the devices that wrote it: `load_run` restores a checkpoint
onto any mesh (by default one device), and a resumed run restores into its new mesh's layout.
"""

import dataclasses
import json
import os
import tempfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cotlab_jax import config as config_lib
from cotlab_jax import data, experiment, sharding
from cotlab_jax.metrics import read_metrics

# Config fields that change the shapes or structure of the checkpointed state.
STATE_SHAPE_FIELDS = (
    "data.vocab_size", "model.num_hidden_layers", "model.hidden_size", "model.intermediate_size",
    "model.num_attention_heads", "model.num_key_value_heads", "model.head_dim",
    "model.tie_word_embeddings",
)


class RunError(RuntimeError):
    """A run cannot start or go on; the message says why in one line."""


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


def prepare_workdir(workdir: str, config) -> None:
    """Creates the run directory, or checks that a resumed run keeps the state's shapes (the
    mesh may change: the checkpoint is resharded on restore)."""
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


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True))


def latest_checkpoint(workdir: str, keep: int) -> int | None:
    """The step of a run directory's latest checkpoint; None if it has none."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    with checkpoint_manager(workdir, keep) as manager:
        return manager.latest_step()


def restore_state(manager: ocp.CheckpointManager, step: int, exp: experiment.Experiment):
    """(graphdef, the train state of checkpoint `step`) laid out over `exp.mesh`, whatever mesh
    wrote it: orbax reads each array into the target's sharding."""
    graphdef, target = experiment.abstract_state(exp)
    return graphdef, manager.restore(step, args=ocp.args.StandardRestore(target))


def frozen_eval_set(workdir: str, exp: experiment.Experiment) -> dict[str, np.ndarray]:
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
    """A trained run loaded back: what evaluation and export need."""

    config: ml_collections.ConfigDict
    spec: data.TaskSpec
    graphdef: object
    params: object
    step: int
    world: dict
    workdir: str


def load_run(workdir: str, step: int | str = "latest",
             mesh: jax.sharding.Mesh | None = None) -> Run:
    """The config, model and parameters of a run's checkpoint (`latest` or a step number),
    placed on `mesh` (default: one local device; any mesh works, whatever trained the run)."""
    config = load_config(workdir)
    if mesh is None:
        mesh = sharding.make_mesh({}, devices=jax.local_devices()[:1])
    exp = experiment.setup(config, mesh)
    with checkpoint_manager(workdir, config.train.keep_checkpoints) as manager:
        steps = manager.all_steps()
        if not steps:
            raise RunError(f"{workdir} has no checkpoint")
        if step == "latest":
            step = max(steps)
        elif int(step) not in steps:
            raise RunError(f"{workdir} has no checkpoint at step {step}; it has {sorted(steps)}")
        graphdef, state = restore_state(manager, int(step), exp)
    world = data.make_world(data.root_keys(config.seed)["world"], exp.spec)
    return Run(config=config, spec=exp.spec, graphdef=graphdef, params=state["params"],
               step=int(step), world=world, workdir=workdir)


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
    last = {kind: next((r for r in reversed(records) if r["kind"] == kind), {})
            for kind in ("train", "eval")}
    strip = ("step", "kind")
    results = dict(run_name=config_lib.run_name(config), step=step, n_params=n_params,
                   train={k: v for k, v in last["train"].items() if k not in strip},
                   eval={k: v for k, v in last["eval"].items() if k not in strip})
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "results.json"), results)
    return results


def write_failure(workdir: str, error: str, step: int) -> None:
    """`failed.json`: why the run stopped (a relaunched sweep skips it until it is deleted)."""
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "failed.json"), dict(error=error, step=step))
