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

import json
import math
import os

from cotlab_jax import config as config_lib
from cotlab_jax import evaluate, experiment, rundir, size_packing


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
    (`size_packing.pack`, `evaluate.evaluate_size_packed`). Reads only.

    Returns {"sweep", "step", "programs": [{"members": [indices], "why": text}], "members":
    [{"index", "dir", "values", "step", "metrics", "metrics_by_k"} or {..., "skipped": why}]}.
    """
    members = _sweep_members(sweep_dir)
    loaded, results = [], []
    for member in members:
        workdir = os.path.join(sweep_dir, member["dir"])
        try:
            run = rundir.load_run(workdir, rundir.parse_step(step))
            eval_set = rundir.read_eval_set(os.path.join(workdir, "eval_set.npz"), run.spec)
        except (rundir.RunError, FileNotFoundError) as error:
            results.append(dict(member, skipped=str(error)))
            continue
        if n_eval_tasks is not None:
            if n_eval_tasks > len(eval_set["k"]):
                raise rundir.RunError(
                    f"n_eval_tasks={n_eval_tasks}: member {member['index']}'s frozen eval set "
                    f"has {len(eval_set['k'])} tasks"
                )
            eval_set = {name: value[:n_eval_tasks] for name, value in eval_set.items()}
        model_config = experiment.model_config(run.config, run.spec)
        settings = dict(
            batch_size=batch_size or run.config.eval.batch_size,
            max_pred_tokens=max_pred_tokens or run.config.eval.max_pred_tokens,
        )
        counts = config_lib.parse_example_counts(
            "all" if example_counts is None else example_counts,
            run.spec.K,
            name="example_counts",
            allow_empty=False,
        )
        key = (
            run.spec,
            size_packing.shared_fields(model_config),
            len(eval_set["k"]),
            tuple(sorted(settings.items())),
            tuple(counts),
        )
        loaded.append((key, member, run, model_config, eval_set, settings, counts))
        results.append(member)
    groups: dict[tuple, list] = {}
    for entry in loaded:
        groups.setdefault(entry[0], []).append(entry)
    programs = []
    by_index = {}
    for group in groups.values():
        _, _, first_run, _, _, settings, counts = group[0]
        pack = size_packing.pack([(mc, run.params) for _, _, run, mc, _, _, _ in group])
        outputs = evaluate.evaluate_size_packed(
            pack.graphdef,
            pack.params,
            pack.sizes,
            [eval_set for *_, eval_set, _, _ in group],
            first_run.spec,
            example_counts=counts,
            answer_rule=answer_rule,
            **settings,
        )
        indices = [member["index"] for _, member, *_ in group]
        programs.append(dict(members=indices, why=_why_shared(group, pack.config)))
        for (_, member, run, *_), output in zip(group, outputs, strict=True):
            by_index[member["index"]] = dict(
                member,
                step=int(run.step),
                metrics=_json_metrics(output["metrics"]),
                metrics_by_k={
                    str(count): _json_metrics(values)
                    for count, values in output["metrics_by_k"].items()
                },
            )
    return dict(
        sweep=sweep_dir,
        step=step,
        answer_rule=answer_rule,
        programs=programs,
        members=[by_index.get(m["index"], m) for m in results],
    )


def _why_shared(group, packed) -> str:
    spec = group[0][2].spec
    differing = [
        name
        for name in size_packing.SIZE_FIELDS
        if len({getattr(mc, name) for _, _, _, mc, *_ in group}) > 1
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
