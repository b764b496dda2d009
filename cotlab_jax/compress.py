"""The second paper's pipeline as one command: distill, prune, re-distill, quantize, report.

    python -m cotlab_jax.compress --teacher=runs/X --config=configs/compress.py[:variant] \\
        --workdir=runs/compress [--teacher_step=latest|N] [--task_config=configs/<file>.py] \\
        [--config.compress.mlp_keep=0.4 ...]

Behdin et al. (EMNLP 2025 industry track, arXiv 2502.14305) turn a large model into a small fast
one: distill it into a student, prune the student with OSSCAR, distill again to recover what
pruning lost, optionally quantize, and serve with a KV cache. Here each stage is its own run
directory under `--workdir`, with a training run's layout (`config.json`, `checkpoints/`,
`metrics.jsonl`, `eval_set.npz`, `results.json`), so `cotlab_jax.evaluate`, `cotlab_jax.export`
and `cotlab_jax.report` work on each:

- `distill/`: the student (`config.model`, trained from scratch by `cotlab_jax.distill` on the
  teacher's task with `config.train` and `config.distill`).
- `prune/`: the student pruned one-shot (`cotlab_jax.prune`: `compress.mlp_keep` of every
  layer's MLP neurons, `compress.heads_keep` of its heads; 1.0 leaves the heads as they are),
  calibrated on `compress.calibration_tasks` training-distribution tasks; one checkpoint, at
  step 0, and `prune_report.json`.
- `redistill/`: the pruned student distilled again from the teacher for
  `compress.redistill_tasks` tasks (a fraction `compress.redistill_on_policy_fraction` of its
  steps on policy), starting from `prune/`.
- `quantize/` (unless `compress.quantize` is ""): the re-distilled student quantized with qwix
  (`cotlab_jax.quantize`, scheme `compress.quantize`). Its metrics are the quantized model's;
  its checkpoint holds the dequantized weights (stored value x scale), so `evaluate` and
  `export` on it run exactly the quantized model for the weight-only schemes (`w8`, `w4`) and
  the model without its activations' quantization for `w8a8` and `fp8`.

Every stage evaluates on the frozen eval set of the teacher's task (the teacher's seed, so the
same tasks for every stage), over the example counts of `config.eval.example_counts` as well.
The command ends in a report (`report/compress.md`, `.csv`, `.json`, and the table on the
terminal): per stage (the teacher first) the model's shape, parameters, bytes as stored,
answer accuracy (and its ratio to the teacher's), accuracy against the number of examples, and
KV-cache greedy decoding in tasks per second, all models timed in one run, in turn, on the same
prompts (`compress.decode_tasks` queries of the eval set, median of `compress.decode_repeats`
rounds after a compiling one).

Resumption: relaunching the same command skips finished stages, resumes a distillation from its
last checkpoint (to the numbers of an uninterrupted run), and redoes an unfinished prune or
quantize stage, which are written to `<stage>.partial/` and renamed when complete. The
pipeline's config is kept in `compress.json`; a relaunch with other values is refused (the
cadences of logging, evaluation and checkpoints may change). `sweep.json` lists the stages, so
`python -m cotlab_jax.report --workdir=DIR` also tables them.

A config with `sweep.axes` (e.g. `configs/compress.py:sweep_keep`) runs one pipeline per member
(the product of the axes' values, as `cotlab_jax.sweep` expands them: student depth, kept
fraction, distillation temperature, on-policy fraction, ...) in `DIR/<member>/`, then one table
of every member's stages in `DIR/report/`.

The teacher is a run of this lab (`--teacher_step` picks its checkpoint) or a Hugging Face
Llama directory (`config.json` + `model.safetensors`), whose task `--task_config` gives.
"""

import copy
import dataclasses
import json
import os
import shutil
import statistics
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx

from cotlab_jax import (
    cli_errors,
    config_flag,
    decode,
    distill,
    evaluate,
    experiment,
    model,
    prune,
    quantize,
    report,
    rundir,
    sharding,
    sweep,
)
from cotlab_jax import config as config_lib
from cotlab_jax.metrics import MetricsWriter, read_metrics

STAGES = ("distill", "prune", "redistill", "quantize")
TEACHER = "teacher"
PIPELINE_FILE = "compress.json"
PARTIAL = ".partial"


def compress_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            teacher="",  # the teacher: a run directory or an HF Llama directory (--teacher)
            teacher_step="latest",  # its checkpoint: "latest" or a step number, as a string
            task_config="",  # an HF teacher's task: configs/<file>.py[:arg] (--task_config)
            mlp_keep=0.5,  # fraction of every layer's MLP neurons kept
            heads_keep=1.0,  # fraction of attention heads kept (1.0: heads left as they are)
            head_units="query_heads",  # prune.HEAD_UNITS
            prune_method="osscar",  # prune.METHODS
            calibration_tasks=128,
            calibration_seed=0,
            redistill_tasks=32 * 100,  # training tasks of the re-distillation
            redistill_on_policy_fraction=0.0,
            quantize="w8",  # a quantize.SCHEMES name, or "" for no quantize stage
            decode_tasks=128,  # eval-set queries every stage decodes in the timing
            decode_repeats=5,
        )
    )


def validate_compress(c) -> None:
    """Rejects an invalid `config.compress` before anything compiles."""
    if not isinstance(c.teacher, str) or not c.teacher:
        config_lib.fail("compress.teacher", c.teacher, "expected a directory (--teacher=DIR)")
    if not (
        isinstance(c.teacher_step, str) and (c.teacher_step == "latest" or c.teacher_step.isdigit())
    ):
        config_lib.fail(
            "compress.teacher_step", c.teacher_step, "expected 'latest' or a step number"
        )
    config_lib.check_number(
        "compress.mlp_keep",
        c.mlp_keep,
        lambda x: 0 < x <= 1,
        "expected a fraction in (0, 1]",
        allow_inf=False,
    )
    config_lib.check_number(
        "compress.heads_keep",
        c.heads_keep,
        lambda x: 0 < x <= 1,
        "expected a fraction in (0, 1] (1.0: heads left as they are)",
        allow_inf=False,
    )
    config_lib.check_number(
        "compress.redistill_on_policy_fraction",
        c.redistill_on_policy_fraction,
        lambda x: 0 <= x <= 1,
        "expected a number in [0, 1]",
        allow_inf=False,
    )
    if c.head_units not in prune.HEAD_UNITS:
        config_lib.fail("compress.head_units", c.head_units, f"expected one of {prune.HEAD_UNITS}")
    if c.prune_method not in prune.METHODS:
        config_lib.fail("compress.prune_method", c.prune_method, f"expected one of {prune.METHODS}")
    if c.quantize and c.quantize not in quantize.SCHEMES:
        config_lib.fail(
            "compress.quantize", c.quantize, f"expected one of {tuple(quantize.SCHEMES)} or ''"
        )
    for name in ("calibration_tasks", "redistill_tasks", "decode_tasks", "decode_repeats"):
        config_lib.check_int(f"compress.{name}", c[name], 1)
    config_lib.check_int("compress.calibration_seed", c.calibration_seed, 0)


# ---------------------------------------------------------------------------------------------
# The stages' configs.


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))


def load_task_config(c) -> ml_collections.ConfigDict | None:
    """The HF teacher's task config named by `compress.task_config`, if any."""
    if not c.task_config:
        return None
    try:
        return config_flag.load_config_file(c.task_config, "task_config")
    except ValueError as error:
        raise config_lib.ConfigError(
            f"config.compress.task_config={c.task_config!r} does not load: {error}"
        ) from None


def stage_configs(config: ml_collections.ConfigDict, task: ml_collections.ConfigDict) -> dict:
    """The distillation configs of the two distilling stages (the re-distillation's model is
    filled in from the pruned one when it exists). Each is a plain distillation config: no
    `compress` group, no sweep."""
    base = _copy(config)
    del base["compress"]
    base.sweep = config_lib.sweep_config()
    first = distill.student_config(base, task)
    second = _copy(first)
    second.train.n_tasks = config.compress.redistill_tasks
    second.train.warmup_steps = min(
        second.train.warmup_steps, second.train.n_tasks // second.train.batch_size
    )
    second.distill.on_policy_fraction = config.compress.redistill_on_policy_fraction
    return dict(distill=first, redistill=second)


def stage_dirs(workdir: str, config: ml_collections.ConfigDict) -> dict[str, str]:
    names = [s for s in STAGES if s != "quantize" or config.compress.quantize]
    return {name: os.path.join(workdir, name) for name in names}


def _flat(tree: dict, prefix: str = "") -> dict:
    """{dotted field: value} of a config as a plain dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_pipeline(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Records the pipeline's config in `compress.json`, or refuses a relaunch that changes it
    (the fields a run's relaunch may change excepted)."""
    path = os.path.join(workdir, PIPELINE_FILE)
    current = json.loads(config.to_json())
    if not os.path.exists(path) and os.path.isdir(workdir) and cli_errors.is_run_directory(workdir):
        raise rundir.RunError(
            f"--workdir={workdir} holds a run or a sweep; a pipeline needs a directory of its own"
        )
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as error:
            raise rundir.RunError(f"{path} is damaged ({error})") from None
        flat_saved, flat_now = _flat(saved), _flat(current)
        changed = rundir.changed_fields(flat_saved, flat_now)
        if changed:
            shown = ", ".join(
                f"{name} ({flat_saved.get(name)!r} -> {flat_now.get(name)!r})" for name in changed
            )
            raise rundir.RunError(
                f"{workdir} holds a pipeline of another config; changed fields: {shown}. "
                f"Relaunch with its config or use another --workdir"
            )
    rundir.make_workdir(workdir)
    if jax.process_index() == 0:
        rundir.write_json(path, current)


def write_stage_index(workdir: str, dirs: dict[str, str]) -> None:
    """`sweep.json` with the stages as members, for `cotlab_jax.report`."""
    names = list(dirs)
    index = dict(
        name=os.path.basename(os.path.abspath(workdir)),
        axes=[["stage", names]],
        members=[dict(index=i, dir=name, values=dict(stage=name)) for i, name in enumerate(names)],
    )
    if jax.process_index() == 0:
        rundir.write_json(os.path.join(workdir, "sweep.json"), index)


# ---------------------------------------------------------------------------------------------
# Stages.


def _finished(workdir: str, config: ml_collections.ConfigDict) -> bool:
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("step") == config.train.n_tasks // config.train.batch_size


def distill_stage(config, teacher_path, workdir, teacher_step, task_config) -> bool:
    """Runs (or resumes, or skips if finished) a distilling stage; False if it was preempted."""
    if _finished(workdir, config):
        return True
    results = distill.distill(config, teacher_path, workdir, teacher_step, task_config)
    return "preempted_at_step" not in results


def _one_device_mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh({}, devices=jax.local_devices()[:1])


def evaluation(graphdef, params, eval_set, exp: experiment.Experiment) -> dict:
    """The eval-set metrics, and over the example counts of `config.eval.example_counts`."""
    cfg = exp.config
    options = dict(
        batch_size=cfg.eval.batch_size,
        max_pred_tokens=cfg.eval.max_pred_tokens,
        answer_rule=cfg.eval.answer_rule,
    )
    metrics = evaluate.evaluate(graphdef, params, eval_set, exp.spec, **options)
    counts = config_lib.parse_example_counts(cfg.eval.example_counts, exp.spec.K)
    by_k = (
        evaluate.flatten_over_k(
            evaluate.evaluate_over_k(
                graphdef, params, eval_set, exp.spec, example_counts=counts, **options
            )
        )
        if counts
        else {}
    )
    return dict(eval=metrics, eval_by_k=by_k)


def write_model_run(
    workdir: str,
    config: ml_collections.ConfigDict,
    params,
    evaluated: tuple,
    record_kind: str,
    record: dict,
    files: dict | None = None,
) -> None:
    """A run directory holding one model, not trained here: its config, frozen eval set, one
    checkpoint at step 0 (a fresh optimizer state around `params`), its evaluation (of the
    model `evaluated` = (graphdef, state), which may differ from `params`' dense model) as the
    metrics of step 0, `results.json`, a `record_kind` record, and JSON `files`."""
    exp = experiment.setup(config, _one_device_mesh())
    rundir.prepare_workdir(workdir, config)
    eval_set = rundir.frozen_eval_set(workdir, exp)
    optimizer = experiment.make_optimizer(config.train, exp.total_steps)
    state = dict(
        step=np.int32(0),
        params=params,
        opt_state=optimizer.init(params),
        window=experiment.empty_window(experiment.extra_window_metrics(config)),
        nonfinite_step=np.int32(-1),
    )
    manager = rundir.checkpoint_manager(workdir, config.train.keep_checkpoints)
    manager.save(0, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()
    results = evaluation(*evaluated, eval_set, exp)
    writer = MetricsWriter(workdir, 0, tensorboard=config.log.tensorboard)
    writer.write(0, "eval", results["eval"])
    if results["eval_by_k"]:
        writer.write(0, "eval_by_k", results["eval_by_k"])
    writer.write(0, record_kind, record)
    writer.close()
    for name, value in (files or {}).items():
        rundir.write_json(os.path.join(workdir, name), value)
    rundir.write_results(config, workdir, 0, model.count_params(params))


def _atomic_stage(workdir: str, write) -> None:
    """Writes a one-shot stage into `workdir.partial`, then renames it: a stage directory
    exists only complete, and a killed attempt is redone from scratch."""
    partial = workdir + PARTIAL
    if os.path.exists(partial):
        shutil.rmtree(partial)
    write(partial)
    os.replace(partial, workdir)


def prune_stage(source_dir: str, workdir: str, c) -> None:
    """Prunes the latest checkpoint of `source_dir` into the run directory `workdir`."""
    if os.path.isdir(workdir):
        return
    run = rundir.load_run(source_dir)
    llama = experiment.model_config(run.config, run.spec)
    batch = prune.calibration_batch(run.config, c.calibration_tasks, c.calibration_seed)
    result = prune.prune_params(
        llama,
        run.graphdef,
        run.params,
        batch,
        mlp_keep=c.mlp_keep,
        heads_keep=None if c.heads_keep == 1 else c.heads_keep,
        method=c.prune_method,
        head_units=c.head_units,
    )
    config = _copy(run.config)
    config.model.intermediate_size = result.config.intermediate_size
    config.model.num_attention_heads = result.config.num_attention_heads
    config.model.num_key_value_heads = result.config.num_key_value_heads
    summary = dict(
        source=os.path.abspath(source_dir),
        source_step=run.step,
        method=c.prune_method,
        mlp_keep=c.mlp_keep,
        heads_keep=c.heads_keep,
        seconds=result.report["seconds"],
        **{
            f"{part}_relative_error_L{layer}": entry[part]["relative_error"]
            for layer, entry in enumerate(result.report["layers"])
            for part in ("attention", "mlp")
            if part in entry
        },
    )
    report_file = dict(result.report, source=summary["source"], source_step=run.step)
    _atomic_stage(
        workdir,
        lambda out: write_model_run(
            out,
            config,
            result.state,
            (result.graphdef, result.state),
            "prune",
            summary,
            {"prune_report.json": report_file},
        ),
    )


def quantize_stage(source_dir: str, workdir: str, scheme: str) -> None:
    """Quantizes the latest checkpoint of `source_dir` into the run directory `workdir`."""
    if os.path.isdir(workdir):
        return
    run = rundir.load_run(source_dir)
    llama = experiment.model_config(run.config, run.spec)
    quantized = quantize.quantize(llama, run.graphdef, run.params, scheme)
    config = _copy(run.config)
    summary = dict(
        source=os.path.abspath(source_dir),
        source_step=run.step,
        scheme=scheme,
        bytes=quantize.weight_bytes(quantized[1]),
        dense_bytes=quantize.weight_bytes(run.params),
    )
    _atomic_stage(
        workdir,
        lambda out: write_model_run(
            out,
            config,
            quantize.dequantized(run.params, quantized[1]),
            quantized,
            "quantize",
            summary,
        ),
    )


def teacher_record(teacher: rundir.Run, workdir: str, eval_config) -> dict:
    """The teacher's evaluation on the pipeline's frozen eval set (`teacher.json`, made
    once)."""
    path = os.path.join(workdir, "teacher.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    exp = experiment.setup(eval_config, _one_device_mesh())
    eval_set = rundir.frozen_eval_set(os.path.join(workdir, "distill"), exp)
    record = dict(
        workdir=os.path.abspath(teacher.workdir),
        step=teacher.step,
        **evaluation(teacher.graphdef, teacher.params, eval_set, exp),
    )
    if jax.process_index() == 0:
        rundir.write_json(path, record)
    return record


# ---------------------------------------------------------------------------------------------
# The report.


@dataclasses.dataclass
class StageModel:
    """A stage's model as evaluated and timed ((graphdef, state): for the quantize stage the
    quantized model), its dense parameters (shape and count), and its metrics."""

    name: str
    graphdef: object
    state: object
    dense: object
    eval: dict
    eval_by_k: dict


def _last(records: list[dict], kind: str) -> dict:
    found = next((r for r in reversed(records) if r["kind"] == kind), {})
    return {k: v for k, v in found.items() if k not in ("step", "kind")}


def stage_models(workdir: str, config, teacher_path: str, task_config) -> list[StageModel]:
    """The teacher and every stage's model, with their metrics."""
    c = config.compress
    teacher = distill.load_teacher(
        teacher_path, rundir.parse_step(c.teacher_step), _one_device_mesh(), task_config
    )
    record = teacher_record(teacher, workdir, stage_configs(config, teacher.config)["distill"])
    models = [
        StageModel(
            TEACHER,
            teacher.graphdef,
            teacher.params,
            teacher.params,
            record["eval"],
            record["eval_by_k"],
        )
    ]
    dirs = stage_dirs(workdir, config)
    for name, path in dirs.items():
        run = rundir.load_run(path)
        records = read_metrics(os.path.join(path, "metrics.jsonl"))
        graphdef, state, dense = run.graphdef, run.params, run.params
        if name == "quantize":  # the quantized model itself, not its dequantized checkpoint
            made = _last(records, "quantize")
            source = rundir.load_run(dirs["redistill"])
            dense = source.params
            graphdef, state = quantize.quantize(
                experiment.model_config(source.config, source.spec),
                source.graphdef,
                source.params,
                made["scheme"],
            )
        models.append(
            StageModel(
                name, graphdef, state, dense, _last(records, "eval"), _last(records, "eval_by_k")
            )
        )
    return models


def model_shape(params) -> dict:
    """Depth, widths and heads of a dense Llama state, read off its weights."""
    pure = nnx.to_pure_dict(params)["layers"]
    layers, hidden, heads, _ = pure["self_attn"]["q_proj"].shape
    return dict(
        layers=layers,
        hidden=hidden,
        mlp=pure["mlp"]["gate_proj"].shape[-1],
        heads=heads,
        kv_heads=pure["self_attn"]["k_proj"].shape[2],
    )


def time_decoding(models: list[StageModel], eval_set: dict, spec, config) -> dict[str, float]:
    """Tasks per second of KV-cache greedy decoding, every model on the same prompts, timed in
    turn in each round (so all see the same machine load); the median over the rounds."""
    c = config.compress
    n = min(c.decode_tasks, len(eval_set["query_ids"]))
    prompts = jax.numpy.asarray(eval_set["query_ids"][:n])
    prompt_mask = jax.numpy.asarray(eval_set["query_mask"][:n]).astype(bool)
    if spec.special_tokens:
        new_tokens, eos = config.eval.max_pred_tokens, spec.token_id("eos")
        pad = spec.token_id("pad")
    else:
        new_tokens, eos, pad = spec.target_len, None, 0

    def run(m):
        return decode.greedy_decode(m.graphdef, m.state, prompts, prompt_mask, new_tokens, eos, pad)

    for m in models:
        jax.block_until_ready(run(m))  # compile
    seconds = {m.name: [] for m in models}
    for _ in range(c.decode_repeats):
        for m in models:
            start = time.perf_counter()
            jax.block_until_ready(run(m))
            seconds[m.name].append(time.perf_counter() - start)
    return {name: n / statistics.median(s) for name, s in seconds.items()}


def stage_rows(models: list[StageModel], tasks_per_s: dict[str, float]) -> list[dict]:
    """The report's rows: one per model, the teacher first."""
    teacher_acc = models[0].eval.get("answer_acc")
    teacher_speed = tasks_per_s[models[0].name]
    rows = []
    for m in models:
        acc = m.eval.get("answer_acc")
        row = dict(
            stage=m.name,
            **model_shape(m.dense),
            params=model.count_params(m.dense),
            bytes=quantize.weight_bytes(m.state),
            answer_acc=acc,
            acc_vs_teacher=acc / teacher_acc if acc is not None and teacher_acc else None,
            tasks_per_s=tasks_per_s[m.name],
            speed_vs_teacher=tasks_per_s[m.name] / teacher_speed,
        )
        row.update(
            {
                name.replace("answer_acc_k", "acc_k"): value
                for name, value in m.eval_by_k.items()
                if name.startswith("answer_acc_k")
            }
        )
        rows.append(row)
    return _same_keys(rows)


def _same_keys(rows: list[dict]) -> list[dict]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in keys} for row in rows]


def write_report(workdir: str, rows: list[dict], meta: dict) -> dict:
    out_dir = os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    table = report.markdown_table(rows)
    device = jax.devices()[0]
    heading = (
        f"# Compression pipeline `{os.path.basename(os.path.abspath(workdir))}`\n\n"
        f"Teacher `{meta['teacher']}`; decoding timed on {device.device_kind} "
        f"({meta['decode_tasks']} eval-set queries, median of {meta['decode_repeats']} rounds, "
        f"all models in turn).\n\n"
    )
    with open(os.path.join(out_dir, "compress.md"), "w") as f:
        f.write(heading + table + "\n")
    report.write_csv(os.path.join(out_dir, "compress.csv"), rows)
    rundir.write_json(
        os.path.join(out_dir, "compress.json"),
        dict(meta, device_kind=device.device_kind, platform=device.platform, stages=rows),
    )
    return dict(table=table, out_dir=out_dir, rows=rows)


# ---------------------------------------------------------------------------------------------
# The pipeline.


def prepare(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, object]:
    """Validates the pipeline config (every stage's groups, before anything compiles); returns
    the teacher's task config and the HF teacher's task config (or None)."""
    if "compress" not in config or "distill" not in config:
        raise config_lib.ConfigError(
            "config.compress or config.distill is missing: a pipeline config sets "
            "config.distill = distill.distill_defaults() and "
            "config.compress = compress.compress_defaults()"
        )
    validate_compress(config.compress)
    distill.validate_distill(config.distill)
    task_config = load_task_config(config.compress)
    task = distill.teacher_task(config.compress.teacher, task_config)
    for stage_config in stage_configs(config, task).values():
        experiment.setup(stage_config)
    return task, task_config


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the pipeline of `config` in `workdir`; returns {"report": ...}, or
    {"preempted": stage}."""
    task, task_config = prepare(config)
    c = config.compress
    check_pipeline(workdir, config)
    dirs = stage_dirs(workdir, config)
    write_stage_index(workdir, dirs)
    configs = stage_configs(config, task)
    if not distill_stage(
        configs["distill"],
        c.teacher,
        dirs["distill"],
        rundir.parse_step(c.teacher_step),
        task_config,
    ):
        return dict(preempted="distill")
    prune_stage(dirs["distill"], dirs["prune"], c)
    redistill = configs["redistill"]
    redistill.model = rundir.load_config(dirs["prune"]).model
    redistill.distill.init_from = os.path.abspath(dirs["prune"])
    if not distill_stage(
        redistill, c.teacher, dirs["redistill"], rundir.parse_step(c.teacher_step), task_config
    ):
        return dict(preempted="redistill")
    if "quantize" in dirs:
        quantize_stage(dirs["redistill"], dirs["quantize"], c.quantize)
    models = stage_models(workdir, config, c.teacher, task_config)
    exp = experiment.setup(configs["distill"], _one_device_mesh())
    eval_set = rundir.frozen_eval_set(dirs["distill"], exp)
    speeds = time_decoding(models, eval_set, exp.spec, config)
    rows = stage_rows(models, speeds)
    meta = dict(
        teacher=os.path.abspath(c.teacher),
        decode_tasks=min(c.decode_tasks, len(eval_set["query_ids"])),
        decode_repeats=c.decode_repeats,
    )
    return dict(report=write_report(workdir, rows, meta))


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """One pipeline per member of `config.sweep.axes` (expanded by `cotlab_jax.sweep`), then
    a table of every member's stages."""
    task, _ = prepare(config)
    merged = _copy(config)
    merged.data = ml_collections.ConfigDict(task.data.to_dict())
    merged.seed = task.seed
    members = sweep.expand(merged)
    rows = []
    for m in members:
        outcome = run_pipeline(m.config, os.path.join(workdir, m.name))
        if "preempted" in outcome:
            return outcome
        swept = {report.short_names(m.config.sweep.axes)[k]: v for k, v in m.values.items()}
        rows += [dict(member=m.index, **swept, **row) for row in outcome["report"]["rows"]]
    rows = _same_keys(rows)
    meta = dict(
        teacher=os.path.abspath(config.compress.teacher),
        decode_tasks=config.compress.decode_tasks,
        decode_repeats=config.compress.decode_repeats,
        axes=[[path, list(values)] for path, values in config.sweep.axes],
        members=[dict(index=m.index, dir=m.name, values=m.values) for m in members],
    )
    return dict(report=write_report(workdir, rows, meta))


# ---------------------------------------------------------------------------------------------
# The command line.


def define_flags() -> dict:
    """The command line's flags; defined only when it runs."""
    return dict(
        config=config_flag.define_config_flag(
            help_string="Pipeline config (configs/compress.py[:variant])."
        ),
        task_config=flags.DEFINE_string(
            "task_config", None, "An HF teacher's task: its config, configs/<file>.py[:arg]."
        ),
        teacher=flags.DEFINE_string(
            "teacher", None, "The teacher: a run directory or an HF Llama directory."
        ),
        teacher_step=flags.DEFINE_string(
            "teacher_step", None, "The teacher run's checkpoint step: latest or a number."
        ),
        workdir=flags.DEFINE_string("workdir", None, "The pipeline's directory."),
    )


_FLAGS: dict = {}  # the command line's flags, defined when it runs


@cli_errors.one_line
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = {name: holder.value for name, holder in _FLAGS.items()}
    for name in ("config", "workdir"):
        if values[name] is None:
            raise app.UsageError(f"--{name} is required")
    config = _copy(values["config"])
    if "compress" not in config:
        raise config_lib.ConfigError(
            "config.compress is missing: a pipeline config sets "
            "config.compress = compress.compress_defaults() (see configs/compress.py)"
        )
    if values["teacher"] is not None:
        config.compress.teacher = values["teacher"]
    if values["teacher_step"] is not None:
        config.compress.teacher_step = values["teacher_step"]
    if values["task_config"] is not None:
        config.compress.task_config = values["task_config"]
    if config.sweep.axes:
        sweep.check_overrides(config, config_flag.overridden_fields())
        outcome = run_sweep(config, values["workdir"])
    else:
        outcome = run_pipeline(config, values["workdir"])
    if "preempted" in outcome:
        print(f"Preempted in stage {outcome['preempted']}; relaunch the same command to go on.")
        return
    if jax.process_index() == 0:
        print(outcome["report"]["table"])
        print(f"report: {outcome['report']['out_dir']}")


if __name__ == "__main__":
    _FLAGS.update(define_flags())
    app.run(main, flags_parser=config_flag.parse_flags)
