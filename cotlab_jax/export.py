"""Hugging Face interchange: export a run's checkpoint, import and evaluate an HF Llama.

Export a checkpoint as a `transformers.LlamaForCausalLM` directory (`config.json` +
`model.safetensors`, float32):

    python -m cotlab_jax.export --workdir=RUN_DIR [--step=latest|N] --out=HF_DIR

Evaluate an HF Llama directory with this lab's evaluation on a run's frozen eval set (the model
must have the run's vocabulary; its own training run, or any other):

    python -m cotlab_jax.export --import_hf=HF_DIR --task_workdir=RUN_DIR [--out=RESULT.json]

With tied embeddings the safetensors file holds `model.embed_tokens.weight` only, as HF's own
`save_pretrained` writes it: `from_pretrained` ties `lm_head` to it.
"""

import functools
import json
import math
import os

import jax
import numpy as np
from absl import app, flags
from safetensors.numpy import load_file, save_file

from cotlab_jax import cli_errors, data, evaluate, experiment, hf_convert, model, rundir

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def hf_config_dict(model_config: model.LlamaConfig, spec: data.TaskSpec) -> dict:
    """The `config.json` of an exported run: `to_hf_config`, plus the special ids if any."""
    config = dict(
        hf_convert.to_hf_config(model_config),
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        torch_dtype="float32",
    )
    if spec.special_tokens:
        config.update(
            bos_token_id=spec.token_id("bos"),
            eos_token_id=spec.token_id("eos"),
            pad_token_id=spec.token_id("pad"),
        )
    return config


def hf_weights(params, model_config: model.LlamaConfig) -> dict[str, np.ndarray]:
    """The tensors to save: `to_hf_state_dict` without the tied `lm_head.weight` alias (HF's own
    `save_pretrained` stores tied weights once)."""
    state_dict = hf_convert.to_hf_state_dict(params, model_config)
    if model_config.tie_word_embeddings:
        del state_dict["lm_head.weight"]
    return state_dict


def write_hf_dir(out: str, params, model_config: model.LlamaConfig, spec: data.TaskSpec) -> None:
    os.makedirs(out, exist_ok=True)
    save_file(
        hf_weights(params, model_config), os.path.join(out, WEIGHTS_NAME), metadata={"format": "pt"}
    )  # transformers reads "pt"-format files
    with open(os.path.join(out, CONFIG_NAME), "w") as f:
        json.dump(hf_config_dict(model_config, spec), f, indent=2, sort_keys=True)


def load_checkpoint(workdir: str, step: int | str = "latest"):
    """`rundir.load_run` (onto one device, whatever devices trained the run), with every way a
    run directory can be unusable as a one-line exit."""
    if not os.path.isdir(workdir):
        raise SystemExit(f"--workdir={workdir}: no such directory")
    try:  # a damaged checkpoint, config or eval set is a RunError naming the file
        return rundir.load_run(workdir, step)
    except rundir.RunError as error:
        raise SystemExit(f"cannot load the run: {error}") from None


def check_export_target(out: str, overwrite: bool) -> None:
    """Exits with one line if `out` is (or lies in) a run directory, is a non-empty directory
    (unless `overwrite`), or cannot be written; checked before the checkpoint is read."""
    run_dir = cli_errors.inside_run_directory(out)
    if run_dir is not None:
        raise SystemExit(f"--out={out}: {run_dir} is a run directory; export writes elsewhere")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise SystemExit(
            f"--out={out} is a non-empty directory; choose another or pass "
            f"--overwrite to replace its {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    cli_errors.check_writable_dir("--out", out)


def export_run(workdir: str, out: str, step: int | str = "latest", overwrite: bool = False) -> int:
    """Writes the checkpoint of `step` as an HF Llama directory at `out` (never into a run
    directory; a non-empty `out` only with `overwrite`); returns its step."""
    check_export_target(out, overwrite)
    run = load_checkpoint(workdir, step)
    model_config = experiment.model_config(run.config, run.spec)
    write_hf_dir(out, run.params, model_config, run.spec)
    return run.step


def load_hf_model(hf_dir: str, **overrides):
    """(LlamaConfig, graphdef, params) of an HF Llama directory (`config.json` +
    `model.safetensors`). Computes in float32 unless `overrides` say otherwise (e.g. dtype)."""
    paths = [os.path.join(hf_dir, name) for name in (CONFIG_NAME, WEIGHTS_NAME)]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: no such file (an HF Llama directory holds "
                f"{CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    with open(paths[0]) as f:
        config = hf_convert.from_hf_config(json.load(f), **{"dtype": "float32", **overrides})
    graphdef, _ = jax.eval_shape(functools.partial(model.init, config), jax.random.key(0))
    params = hf_convert.from_hf_state_dict(load_file(paths[1]), config)
    return config, graphdef, params


def evaluate_hf(
    hf_dir: str, workdir: str, batch_size: int | None = None, max_pred_tokens: int | None = None
) -> dict[str, float]:
    """This lab's metrics of an HF Llama directory on the frozen eval set of run `workdir`.

    Raises `rundir.RunError` (no run there), `FileNotFoundError` (no eval set, no HF files) or
    `ValueError` (an HF model this lab cannot run, or another vocabulary than the run's)."""
    run_config = rundir.load_config(workdir)
    spec = data.TaskSpec.from_config(run_config)
    path = os.path.join(workdir, "eval_set.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the run has no frozen eval set")
    config, graphdef, params = load_hf_model(hf_dir)
    if config.vocab_size != spec.vocab_size:
        raise ValueError(
            f"vocab_size={config.vocab_size}, the run's tasks use data.vocab_size={spec.vocab_size}"
        )
    return evaluate.evaluate(
        graphdef,
        params,
        rundir.read_eval_set(path, spec),
        spec,
        batch_size=batch_size or run_config.eval.batch_size,
        max_pred_tokens=max_pred_tokens or run_config.eval.max_pred_tokens,
    )


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Export: the run directory (as written by main).")
    flags.DEFINE_string("step", "latest", "Export: the checkpoint step, `latest` or a number.")
    flags.DEFINE_string(
        "out",
        None,
        "Export: the HF directory to write. With --import_hf: "
        "write the JSON metrics here (they are always printed).",
    )
    flags.DEFINE_string("import_hf", None, "Evaluate this HF Llama directory instead of exporting.")
    flags.DEFINE_bool("overwrite", False, "Export: write into a non-empty --out directory.")
    flags.DEFINE_string(
        "task_workdir",
        None,
        "With --import_hf: the run whose frozen eval set (and task spec) to evaluate on.",
    )


@cli_errors.one_line
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if f.import_hf:
        if not f.task_workdir:
            raise SystemExit("--import_hf needs --task_workdir (the run whose eval set to use)")
        if f.out:
            cli_errors.check_writable_file("--out", f.out)
        try:
            metrics = evaluate_hf(f.import_hf, f.task_workdir)
        except (rundir.RunError, FileNotFoundError, ValueError) as error:
            raise SystemExit(f"--import_hf={f.import_hf}: {error}") from None
        metrics = {name: value if math.isfinite(value) else None for name, value in metrics.items()}
        text = json.dumps(
            dict(hf_dir=f.import_hf, task_workdir=f.task_workdir, metrics=metrics), indent=2
        )
        print(text)
        if f.out:
            with open(f.out, "w") as out:
                out.write(text + "\n")
        return
    if not f.workdir or not f.out:
        raise SystemExit("export needs --workdir and --out (or --import_hf to evaluate)")
    try:
        step = rundir.parse_step(f.step)
    except rundir.RunError as error:
        raise SystemExit(str(error)) from None
    step = export_run(f.workdir, f.out, step, overwrite=f.overwrite)
    print(f"exported {f.workdir} step {step} to {f.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
