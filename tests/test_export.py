"""Export to and import from Hugging Face Llama directories (cotlab_jax.export)."""

import dataclasses
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from model_helpers import forward, random_batch
from safetensors.numpy import load_file
from test_train import ROOT, tiny_config

from cotlab_jax import experiment, export, rundir, train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny special-token run (10 steps), its final eval metrics, its checkpoint exported and
    loaded back."""
    root = tmp_path_factory.mktemp("export")
    workdir, out = str(root / "run"), str(root / "hf")
    config = tiny_config("cot_special_token")
    config.train.n_tasks = 8 * 10
    results = train.train_and_evaluate(config, workdir)
    assert export.export_run(workdir, out) == 10
    return workdir, out, results["eval"], rundir.load_run(workdir)


def test_from_pretrained_gives_the_same_logits(exported):
    _, out, _, run = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.bos_token_id == run.spec.token_id("bos") == 30
    assert hf.config.eos_token_id == run.spec.token_id("eos")
    assert hf.config.pad_token_id == run.spec.token_id("pad")
    # Tied: one stored tensor, and HF's lm_head really is the embedding matrix.
    assert "lm_head.weight" not in load_file(os.path.join(out, export.WEIGHTS_NAME))
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    ids, mask = random_batch(3, 4, 20, run.spec.vocab_size, pads=(0, 4, 9, 19))
    ours = np.asarray(forward(run.graphdef, run.params, ids, mask))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
            attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
            position_ids=torch.from_numpy(positions.astype(np.int64)),
        ).logits.numpy()
    real = np.asarray(mask)
    assert np.abs(ours[real]).max() > 0.5  # trained logits, not a degenerate all-zero model
    assert np.abs(ours[real] - theirs[real]).max() < 1e-4


def test_import_gives_identical_parameters_and_metrics(exported):
    workdir, out, final_eval, run = exported
    config, _, params = export.load_hf_model(out)
    assert config == dataclasses.replace(experiment.setup(run.config).model_config, dtype="float32")
    for ours, back in zip(jax.tree.leaves(run.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(back))
    # The lab's evaluation of the HF directory is the run's own final evaluation (up to the
    # summation order of the run's sharded batches).
    metrics = export.evaluate_hf(out, workdir)
    assert metrics == pytest.approx({name: final_eval[name] for name in metrics}, rel=1e-6)


def _damaged_copy(workdir, dest, damage):
    shutil.copytree(workdir, dest)
    step_dir = os.path.join(dest, "checkpoints", "10")
    files = sorted(os.path.join(d, name) for d, _, names in os.walk(step_dir) for name in names)
    damage(files)
    return str(dest)


def _truncate(files):
    for path in files:
        if os.path.getsize(path) > 0:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


def _delete_data(files):
    for path in files:
        if "ocdbt" in path or path.endswith(".data") or "/d/" in path:
            os.remove(path)


@pytest.mark.parametrize("damage", [_truncate, _delete_data])
def test_export_refuses_a_damaged_checkpoint(exported, tmp_path, damage):
    workdir = _damaged_copy(exported[0], tmp_path / "run", damage)
    with pytest.raises(SystemExit, match="cannot load"):
        export.export_run(workdir, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


def test_export_refuses_missing_runs_and_steps(exported, tmp_path):
    with pytest.raises(SystemExit, match="no such directory"):
        export.export_run(str(tmp_path / "nothing"), str(tmp_path / "hf"))
    with pytest.raises(SystemExit, match=r"no checkpoint at step 7; it has \[0, 10\]"):
        export.export_run(exported[0], str(tmp_path / "hf"), step=7)


def test_command_line_refuses_in_one_line(exported, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cotlab_jax.export",
            f"--workdir={exported[0]}",
            "--step=3",
            f"--out={tmp_path / 'hf'}",
        ],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr  # above it, only orbax's log lines
    assert result.stderr.strip().splitlines()[-1] == (
        f"cannot load the run: {exported[0]} has no checkpoint at step 3; it has [0, 10]"
    )
