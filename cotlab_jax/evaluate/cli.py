"""The evaluation's command line, for a run written by `cotlab_jax.main` (it prints the JSON
result; the run may have been trained on any devices, it loads onto one):

    python -m cotlab_jax.evaluate --workdir=DIR [--step=latest|N]
        [--drop_think=first|last|random --drop_k=K [--drop_seed=S]] [--force=think|answer]
        [--prompt_strategy=S] [--n_inputs=N] [--n_parents=M] [--chain_length=C]
        [--n_examples=K] [--n_eval_tasks=N] [--batch_size=B] [--max_pred_tokens=T]
        [--answer_rule=reference|vllm|strict] [--n_samples=S --temperature=T [--top_p=P]
        [--sample_seed=S]] [--eval_dataset=TFDS_DIR] [--out=FILE.json [--save_predictions]]
        [--over_k [--example_counts=1,2,4]]

Without --prompt_strategy/--n_inputs/--n_parents/--chain_length/--n_examples it evaluates the
run's frozen eval set (its first N tasks with --n_eval_tasks); with any of them, a fresh eval set
of the changed spec (`evaluate.variant_spec`: each shape flag fixes that count for every task)
from the run's seed + 1000 and the run's world. The reference's special-token evaluation of a
hybrid-trained run is `--prompt_strategy=cot_special_token --n_inputs=4 --n_parents=4
--chain_length=4 --n_examples=40 --n_eval_tasks=1000 --answer_rule=vllm` with its
`--temperature`/`--n_samples`.
Special-token outputs are read by --answer_rule (default `reference`, the reference trainer's
rule; see `evaluate.extract_answers`). With --temperature > 0 every query gets --n_samples
sampled generations and the answer is their majority vote (`evaluate.evaluate_sampled`);
otherwise decoding is greedy. With --over_k the result also has `metrics_by_k` {K': metrics} for
K' = 1 .. K (or the chosen --example_counts), on the same (variant) eval set, decoded greedily.

A whole sweep directory (`sweep.json`, as `python -m cotlab_jax.main` writes for a sweep):

    python -m cotlab_jax.evaluate --sweep=DIR [--step=latest|N] [--n_eval_tasks=N]
        [--batch_size=B] [--max_pred_tokens=T] [--answer_rule=...] [--example_counts=1,2,4]
        [--out=FILE.json]

evaluates every member with a checkpoint on its frozen eval set and over example counts
(`sweep_eval.evaluate_sweep`). Members that share a task spec and differ at most in model sizes
(depth, heads, KV heads, head dimension, MLP or hidden width) run as one size-packed program
(`cotlab_jax.size_packing`), with each member's own results. Nothing is written into the sweep
or its members' run directories.
"""

import json
import math
import os

import jax
import numpy as np
from absl import app, flags

from cotlab_jax import cli_errors, data, evaluate, rundir, sweep_eval
from cotlab_jax import config as config_lib


def define_flags() -> None:
    """The command line's flags; defined only when it runs, so that importing this module
    adds no flags to another program."""
    flags.DEFINE_string("workdir", None, "The run directory (as written by cotlab_jax.main).")
    flags.DEFINE_string(
        "sweep",
        None,
        "A sweep directory (sweep.json): evaluate every member, members of one task spec that "
        "differ only in model sizes in one size-packed program.",
    )
    flags.DEFINE_string("step", "latest", "The checkpoint step to evaluate: `latest` or a number.")
    flags.DEFINE_enum(
        "drop_think",
        None,
        list(evaluate.DROP_CHOICES),
        "Drop the think span of --drop_k demonstrations: the first, last or random ones.",
    )
    flags.DEFINE_integer("drop_k", None, "How many think spans --drop_think drops.", lower_bound=0)
    flags.DEFINE_integer("drop_seed", 0, "The key for --drop_think=random.")
    flags.DEFINE_enum(
        "force",
        None,
        list(evaluate.FORCE_TOKENS),
        "Append <think_s> (think) or <ans_s> (answer) to every query.",
    )
    flags.DEFINE_enum(
        "prompt_strategy",
        None,
        list(config_lib.PROMPT_STRATEGIES),
        "Evaluate on a fresh eval set with this prompt strategy (special tokens "
        "must stay on or off as in training).",
    )
    flags.DEFINE_integer(
        "n_inputs", None, "Evaluate on a fresh eval set with this many inputs.", lower_bound=1
    )
    flags.DEFINE_integer(
        "n_parents", None, "Evaluate on a fresh eval set with this many parents.", lower_bound=1
    )
    flags.DEFINE_enum(
        "answer_rule",
        "reference",
        list(evaluate.ANSWER_RULES),
        "How special-token outputs are read: the reference trainer's rule, the "
        "reference's vLLM evaluator's, or this lab's strict one.",
    )
    flags.DEFINE_integer(
        "n_samples", 1, "Sampled generations per query (majority vote).", lower_bound=1
    )
    flags.DEFINE_float(
        "temperature", 0.0, "Sampling temperature; 0 decodes greedily.", lower_bound=0.0
    )
    flags.DEFINE_float(
        "top_p", 1.0, "Nucleus sampling: keep the most probable tokens up to this probability mass."
    )
    flags.DEFINE_integer("sample_seed", 0, "The key of the sampled generations.")
    flags.DEFINE_integer(
        "chain_length", None, "Evaluate on a fresh eval set with this chain length.", lower_bound=1
    )
    flags.DEFINE_integer(
        "n_examples", None, "Evaluate on a fresh eval set with this example count.", lower_bound=1
    )
    flags.DEFINE_integer(
        "n_eval_tasks",
        None,
        "Eval tasks (default: the run's config.eval; with the frozen set, its first N tasks).",
        lower_bound=1,
    )
    flags.DEFINE_integer(
        "batch_size", None, "Eval batch size (default: the run's config.eval).", lower_bound=1
    )
    flags.DEFINE_integer(
        "max_pred_tokens",
        None,
        "Decoding budget with special tokens (default: the run's config.eval).",
        lower_bound=1,
    )
    flags.DEFINE_string(
        "eval_dataset",
        None,
        "Evaluate on this TFDS dataset's test split (a "
        "directory written by `python -m cotlab_jax.tfds_builder`) instead of "
        "the run's frozen eval set.",
    )
    flags.DEFINE_string("out", None, "Write the JSON result here (it is always printed).")
    flags.DEFINE_bool("save_predictions", False, "Also write the per-task arrays to OUT.npz.")
    flags.DEFINE_bool(
        "over_k",
        False,
        "Also evaluate with only each task's last K' examples "
        "kept, for K' = 1 .. K: the result's `metrics_by_k`.",
    )
    flags.DEFINE_list(
        "example_counts",
        None,
        "With --over_k: the example counts K' (comma-separated, each in [1, K]; default 1 .. K).",
    )


def check_variant(
    spec: data.TaskSpec, drop_think: str | None, force: str | None, chain_length: int | None
) -> None:
    """Exits with a one-line message if the variant does not apply to the (variant) task spec."""
    if drop_think is not None and spec.prompt_strategy not in (
        "cot_special_token",
        "hybrid_special_token",
    ):
        raise SystemExit(
            f"--drop_think: prompt_strategy {spec.prompt_strategy!r} has no think spans"
        )
    if force is not None and not spec.special_tokens:
        raise SystemExit(f"--force: prompt_strategy {spec.prompt_strategy!r} has no special tokens")
    if chain_length is not None and spec.ablation_fixed_dag and (chain_length != spec.C):
        raise SystemExit(
            "--chain_length: the run's single fixed DAG (data.ablation_fixed_dag) "
            f"has {spec.C} chain tokens"
        )


def variant_eval_set(
    run,
    drop_think=None,
    drop_k=None,
    drop_seed=0,
    force=None,
    chain_length=None,
    n_examples=None,
    n_eval_tasks=None,
    eval_dataset=None,
    prompt_strategy=None,
    n_inputs=None,
    n_parents=None,
):
    """(eval set, spec) of the requested variant for a `rundir.Run` (config, spec, world,
    workdir)."""
    spec = run.spec
    shape = dict(
        prompt_strategy=prompt_strategy,
        n_inputs=n_inputs,
        n_parents=n_parents,
        chain_length=chain_length,
        n_examples=n_examples,
    )
    fresh = any(value is not None for value in shape.values())
    if eval_dataset is not None:
        if fresh:
            raise SystemExit(
                "--eval_dataset fixes the tasks: it excludes --prompt_strategy, "
                "--n_inputs, --n_parents, --chain_length and --n_examples"
            )
        from cotlab_jax import tfds_builder  # TFDS is imported only when asked for

        try:
            eval_set = tfds_builder.load_eval_set(eval_dataset, spec)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"--eval_dataset={eval_dataset}: {error}") from None
        except Exception as error:  # TFDS reports a foreign directory with many types
            raise SystemExit(
                f"--eval_dataset={eval_dataset}: not a token-task dataset written "
                f"by cotlab_jax.tfds_builder ({type(error).__name__}: "
                f"{cli_errors.describe(error)})"
            ) from None
    elif fresh:
        try:
            spec = evaluate.variant_spec(spec, **shape)
        except ValueError as error:
            raise SystemExit(f"cannot evaluate on that task: {error}") from None
        check_variant(spec, drop_think, force, None)
        eval_set = data.build_eval_set(
            run.world,
            data.root_keys(run.config.seed)["eval"],
            spec,
            n_eval_tasks or run.config.eval.n_eval_tasks,
        )
    else:
        path = os.path.join(run.workdir, "eval_set.npz")
        if not os.path.exists(path):
            raise SystemExit(f"no frozen eval set at {path}")
        try:
            eval_set = rundir.read_eval_set(path, spec)
        except rundir.RunError as error:
            raise SystemExit(str(error)) from None
        n_frozen = len(eval_set["k"])
        if n_eval_tasks is not None:
            if n_eval_tasks > n_frozen:
                raise SystemExit(
                    f"--n_eval_tasks={n_eval_tasks}: the frozen eval set has {n_frozen} tasks"
                )
            eval_set = {name: value[:n_eval_tasks] for name, value in eval_set.items()}
    if drop_think is not None:
        eval_set = evaluate.drop_think_spans(
            eval_set, spec, drop_k, drop_think, jax.random.key(drop_seed)
        )
    if force is not None:
        eval_set = evaluate.force_token(eval_set, spec, force)
    return eval_set, spec


def _json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run_cli(
    workdir: str | None,
    step: str,
    *,
    drop_think=None,
    drop_k=None,
    drop_seed=0,
    force=None,
    chain_length=None,
    n_examples=None,
    n_eval_tasks=None,
    batch_size=None,
    max_pred_tokens=None,
    out=None,
    save_predictions=False,
    eval_dataset=None,
    over_k=False,
    example_counts=None,
    prompt_strategy=None,
    n_inputs=None,
    n_parents=None,
    answer_rule="reference",
    n_samples=1,
    temperature=0.0,
    top_p=1.0,
    sample_seed=0,
) -> dict:
    """The command line's work, with its flags as arguments; returns the JSON result."""
    if not workdir:
        raise SystemExit("--workdir is required")
    if not os.path.isdir(workdir):
        raise SystemExit(f"--workdir={workdir}: no such directory")
    if (drop_think is None) != (drop_k is None):
        raise SystemExit("--drop_think and --drop_k go together")
    if save_predictions and out is None:
        raise SystemExit("--save_predictions needs --out")
    if example_counts is not None and not over_k:
        raise SystemExit("--example_counts needs --over_k")
    if answer_rule not in evaluate.ANSWER_RULES:
        raise SystemExit(f"--answer_rule={answer_rule!r}: expected one of {evaluate.ANSWER_RULES}")
    try:
        evaluate.check_sampling(n_samples, temperature, top_p)
    except ValueError as error:
        raise SystemExit(f"--{error}") from None
    # Checked before the evaluation runs, not after.
    if eval_dataset is not None and not os.path.isdir(eval_dataset):
        raise SystemExit(f"--eval_dataset={eval_dataset}: no such directory")
    if out is not None:
        cli_errors.check_outside_runs("--out", out)
        cli_errors.check_writable_file("--out", out)
    try:
        loaded = rundir.load_run(workdir, rundir.parse_step(step))
    except (rundir.RunError, FileNotFoundError) as error:
        raise SystemExit(f"cannot load the run: {error}") from None
    check_variant(loaded.spec, drop_think, force, chain_length)
    eval_set, spec = variant_eval_set(
        loaded,
        drop_think,
        drop_k,
        drop_seed,
        force,
        chain_length,
        n_examples,
        n_eval_tasks,
        eval_dataset,
        prompt_strategy,
        n_inputs,
        n_parents,
    )
    if example_counts is not None:
        if not isinstance(example_counts, str):  # --example_counts is a list of strings
            example_counts = ",".join(example_counts)
        try:
            example_counts = config_lib.parse_example_counts(
                example_counts, spec.K, name="--example_counts", allow_empty=False
            )
        except config_lib.ConfigError as error:
            raise SystemExit(str(error)) from None
    sizes = dict(
        batch_size=batch_size or loaded.config.eval.batch_size,
        max_pred_tokens=max_pred_tokens or loaded.config.eval.max_pred_tokens,
    )
    sampled = temperature > 0
    if sampled:
        metrics, per_task = evaluate.evaluate_sampled(
            loaded.graphdef,
            loaded.params,
            eval_set,
            spec,
            n_samples=n_samples,
            temperature=temperature,
            top_p=top_p,
            seed=sample_seed,
            answer_rule=answer_rule,
            return_predictions=True,
            **sizes,
        )
    else:
        metrics, per_task = evaluate.evaluate(
            loaded.graphdef,
            loaded.params,
            eval_set,
            spec,
            return_predictions=True,
            answer_rule=answer_rule,
            **sizes,
        )
    result = dict(
        workdir=workdir,
        step=int(loaded.step),
        prompt_strategy=spec.prompt_strategy,
        n_eval_tasks=len(eval_set["k"]),
        variant=dict(
            drop_think=drop_think,
            drop_k=drop_k,
            drop_seed=drop_seed if drop_think == "random" else None,
            force=force,
            prompt_strategy=prompt_strategy,
            n_inputs=n_inputs,
            n_parents=n_parents,
            chain_length=chain_length,
            n_examples=n_examples,
            eval_dataset=eval_dataset,
        ),
        answer_rule=answer_rule if spec.special_tokens else None,
        sampling=dict(n_samples=n_samples, temperature=temperature, top_p=top_p, seed=sample_seed)
        if sampled
        else None,
        metrics={name: _json_value(value) for name, value in metrics.items()},
    )
    if over_k:
        metrics_by_k = evaluate.evaluate_over_k(
            loaded.graphdef,
            loaded.params,
            eval_set,
            spec,
            example_counts=example_counts,
            answer_rule=answer_rule,
            **sizes,
        )
        result["metrics_by_k"] = {
            str(count): {name: _json_value(value) for name, value in values.items()}
            for count, values in metrics_by_k.items()
        }
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
        if save_predictions:
            np.savez(os.path.splitext(out)[0] + ".npz", **per_task)
    return result


# Flags that --sweep does not take (a sweep is evaluated on its members' frozen sets, greedily).
SWEEP_EXCLUDED_FLAGS = (
    "workdir",
    "drop_think",
    "drop_k",
    "force",
    "prompt_strategy",
    "n_inputs",
    "n_parents",
    "chain_length",
    "n_examples",
    "eval_dataset",
    "save_predictions",
    "over_k",
    "drop_seed",
    "n_samples",
    "temperature",
    "top_p",
    "sample_seed",
)


def run_sweep_cli(sweep_dir: str, step: str, out: str | None, **options) -> dict:
    """--sweep's work: checks, `evaluate_sweep`, prints and writes the JSON result."""
    if not os.path.isdir(sweep_dir):
        raise SystemExit(f"--sweep={sweep_dir}: no such directory")
    if options.get("answer_rule") not in evaluate.ANSWER_RULES:
        raise SystemExit(
            f"--answer_rule={options.get('answer_rule')!r}: expected one of {evaluate.ANSWER_RULES}"
        )
    example_counts = options.pop("example_counts", None)
    if example_counts is not None and not isinstance(example_counts, str):
        example_counts = ",".join(example_counts)  # --example_counts is a list of strings
    if out is not None:
        cli_errors.check_writable_file("--out", out)
        cli_errors.check_outside_runs("--out", out)
    try:
        rundir.parse_step(step)
        result = sweep_eval.evaluate_sweep(
            sweep_dir, step, example_counts=example_counts, **options
        )
    except (rundir.RunError, config_lib.ConfigError, ValueError) as error:
        raise SystemExit(f"cannot evaluate the sweep: {error}") from None
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    return result


@cli_errors.one_line
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if f.sweep is not None:
        given = [
            name
            for name in SWEEP_EXCLUDED_FLAGS
            if f[name].present  # set on the command line, even to its default
        ]
        if given:
            raise SystemExit(
                f"--sweep evaluates every member greedily on its frozen eval set; it does not "
                f"take --{', --'.join(given)}"
            )
        run_sweep_cli(
            f.sweep,
            f.step,
            f.out,
            n_eval_tasks=f.n_eval_tasks,
            batch_size=f.batch_size,
            max_pred_tokens=f.max_pred_tokens,
            answer_rule=f.answer_rule,
            example_counts=f.example_counts,
        )
        return
    run_cli(
        f.workdir,
        f.step,
        drop_think=f.drop_think,
        drop_k=f.drop_k,
        drop_seed=f.drop_seed,
        force=f.force,
        chain_length=f.chain_length,
        n_examples=f.n_examples,
        n_eval_tasks=f.n_eval_tasks,
        batch_size=f.batch_size,
        max_pred_tokens=f.max_pred_tokens,
        out=f.out,
        save_predictions=f.save_predictions,
        eval_dataset=f.eval_dataset,
        over_k=f.over_k,
        example_counts=f.example_counts,
        prompt_strategy=f.prompt_strategy,
        n_inputs=f.n_inputs,
        n_parents=f.n_parents,
        answer_rule=f.answer_rule,
        n_samples=f.n_samples,
        temperature=f.temperature,
        top_p=f.top_p,
        sample_seed=f.sample_seed,
    )
