"""A whole sweep directory evaluated, members that differ only in model sizes size-packed.

    result = evaluate_sweep("runs/vocab")   # python -m cotlab_jax.evaluate --sweep=runs/vocab

Every member with a checkpoint is evaluated on its frozen eval set and over example counts.
Members that share a task spec, an eval set size and the eval settings, and whose models differ
at most in `size_packing.SIZE_FIELDS` (depth, heads, KV heads, head dimension, MLP or hidden
width), run as one size-packed program (`size_packing.pack`, `evaluate.evaluate_size_packed`):
a depth sweep {4, 8, 12} of one task compiles once, not three times. Each member's results are
its own (to float32 rounding of the logits). It only reads: nothing is written into the sweep
or its members' run directories.
"""

import dataclasses
import json
import math
import os

import jax

from cotlab_jax import config as config_lib
from cotlab_jax import evaluate, experiment, rundir, sharding, size_packing


def _sweep_members(sweep_dir: str) -> list[dict]:
    path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.exists(path):
        raise rundir.RunError(f"{sweep_dir} holds no sweep (no sweep.json)")
    try:
        with open(path) as f:
            members = json.load(f)["members"]
        return [dict(index=m["index"], dir=m["dir"], values=m["values"]) for m in members]
    except (ValueError, KeyError, TypeError) as error:
        raise rundir.RunError(f"{path} is damaged: not a sweep index ({error!r})") from None


def evaluate_sweep(
    sweep_dir: str,
    step: str = "latest",
    *,
    n_eval_tasks: int | None = None,
    batch_size: int | None = None,
    max_pred_tokens: int | None = None,
    answer_rule: str = "reference",
    example_counts=None,
) -> dict:
    """Every member of a sweep directory with a checkpoint (`step`), on its frozen eval set (its
    first `n_eval_tasks` tasks) and over example counts (`example_counts`, default 1 .. K), as
    few programs as the members allow: members that share a task spec, an eval set size and
    the eval settings, and whose models differ at most in sizes, share one size-packed program
    (`size_packing.pack`, `evaluate.evaluate_size_packed`), one program's parameters in memory
    at a time. Reads only.

    Returns {"sweep", "step", "programs": [{"members": [indices], "why": text}], "members":
    [{"index", "dir", "values", "step", "metrics", "metrics_by_k"} or {..., "skipped": why}]}.
    """
    members = _sweep_members(sweep_dir)
    mesh = sharding.make_mesh({}, devices=jax.local_devices()[:1])
    planned, results = [], {}
    for member in members:  # configs and eval sets only: parameters are loaded per program
        workdir = os.path.join(sweep_dir, member["dir"])
        try:
            exp = experiment.setup(rundir.load_config(workdir), mesh)
            if rundir.latest_checkpoint(workdir) is None:
                raise rundir.RunError(f"{workdir} has no checkpoint")
            eval_set = rundir.read_eval_set(os.path.join(workdir, "eval_set.npz"), exp.spec)
        except (rundir.RunError, config_lib.ConfigError, FileNotFoundError) as error:
            results[member["index"]] = dict(member, skipped=str(error))
            continue
        except (AttributeError, KeyError, TypeError) as error:  # a JSON object, not a config
            results[member["index"]] = dict(member, skipped=f"{workdir}: not a run ({error!r})")
            continue
        if n_eval_tasks is not None:
            if n_eval_tasks > len(eval_set["k"]):
                raise rundir.RunError(
                    f"n_eval_tasks={n_eval_tasks}: member {member['index']}'s frozen eval set "
                    f"has {len(eval_set['k'])} tasks"
                )
            eval_set = {name: value[:n_eval_tasks] for name, value in eval_set.items()}
        settings = dict(
            batch_size=batch_size or exp.config.eval.batch_size,
            max_pred_tokens=max_pred_tokens or exp.config.eval.max_pred_tokens,
            example_counts=tuple(
                config_lib.parse_example_counts(
                    "all" if example_counts is None else example_counts,
                    exp.spec.K,
                    name="example_counts",
                    allow_empty=False,
                )
            ),
        )
        key = (
            exp.spec,
            size_packing.shared_fields(exp.model_config),
            len(eval_set["k"]),
            tuple(settings.items()),
        )
        planned.append((key, _Planned(member, workdir, exp, eval_set, settings)))
    groups: dict[tuple, list[_Planned]] = {}
    for key, entry in planned:
        groups.setdefault(key, []).append(entry)
    programs = []
    for group in groups.values():
        runs = []
        for entry in group:
            try:
                runs.append((entry, rundir.load_run(entry.workdir, rundir.parse_step(step))))
            except rundir.RunError as error:  # e.g. no checkpoint at that step
                results[entry.member["index"]] = dict(entry.member, skipped=str(error))
        if not runs:
            continue
        pack = size_packing.pack([(entry.exp.model_config, run.params) for entry, run in runs])
        outputs = evaluate.evaluate_size_packed(
            pack.graphdef,
            pack.params,
            pack.sizes,
            [entry.eval_set for entry, _ in runs],
            runs[0][0].exp.spec,
            answer_rule=answer_rule,
            **runs[0][0].settings,
        )
        programs.append(
            dict(
                members=[entry.member["index"] for entry, _ in runs],
                why=_why_shared([entry.exp for entry, _ in runs], pack.config),
            )
        )
        for (entry, run), output in zip(runs, outputs, strict=True):
            results[entry.member["index"]] = dict(
                entry.member,
                step=int(run.step),
                metrics=_json_metrics(output["metrics"]),
                metrics_by_k={
                    str(count): _json_metrics(values)
                    for count, values in output["metrics_by_k"].items()
                },
            )
        del pack, runs  # the next program's parameters replace these
    return dict(
        sweep=sweep_dir,
        step=step,
        answer_rule=answer_rule,
        programs=programs,
        members=[results[m["index"]] for m in members],
    )


@dataclasses.dataclass
class _Planned:
    member: dict
    workdir: str
    exp: experiment.Experiment
    eval_set: dict
    settings: dict


def _why_shared(exps, packed) -> str:
    spec = exps[0].spec
    differing = [
        name
        for name in size_packing.SIZE_FIELDS
        if len({getattr(exp.model_config, name) for exp in exps}) > 1
    ]
    sizes = f"sizes differing in {', '.join(differing)}" if differing else "the same sizes"
    return (
        f"task {spec.prompt_strategy!r} (seq_len {spec.seq_len}), {sizes}; packed shape: "
        f"{packed.num_hidden_layers} layers, hidden {packed.hidden_size}, MLP "
        f"{packed.intermediate_size}, {packed.num_attention_heads}/{packed.num_key_value_heads} "
        f"heads of {packed.head_dim}"
    )


def _json_metrics(metrics: dict) -> dict:
    """NaN (a chain index no task has) as JSON null."""
    return {name: value if math.isfinite(value) else None for name, value in metrics.items()}
