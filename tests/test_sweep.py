"""Sweeps: expansion of every named sweep, packing plans, packed training equal to training each
member alone, relaunch after a kill, and the report at the end."""

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cotlab_jax import config as config_lib
from cotlab_jax import data, experiment, packed, rundir, sweep, train
from cotlab_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SWEEP = os.path.join(ROOT, "tests", "configs", "tiny_sweep.py")
TIMING = ("tokens_per_s", "step_time_s")


def load_config_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SWEEP_CONFIGS = load_config_module(os.path.join(ROOT, "configs", "sweep.py"))


def tiny_sweep_config():
    return load_config_module(TINY_SWEEP).get_config()


def run_main(workdir, *flags):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cotlab_jax.main",
            f"--config={TINY_SWEEP}",
            f"--workdir={workdir}",
            *flags,
        ],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=900,
    )


def records(rundir):
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in read_metrics(os.path.join(rundir, "metrics.jsonl"))
    ]


@pytest.mark.parametrize("name", sorted(SWEEP_CONFIGS.SWEEPS))
@pytest.mark.parametrize("scale", ["", ",cpu"])
def test_every_named_sweep_expands_to_the_product_of_its_axes(name, scale):
    config = SWEEP_CONFIGS.get_config(name + scale)
    members = sweep.expand(config)
    axes = SWEEP_CONFIGS.SWEEPS[name]["axes"]
    assert len(members) == math.prod(len(values) for _, values in axes)
    assert len({m.name for m in members}) == len(members)
    for m in members:
        assert m.config.sweep.member == m.index
        for path, value in m.values.items():
            assert sweep.get_field(m.config, path) == value
        assert m.name.startswith(config_lib.run_name(m.config))
    first = members[0].values
    assert list(first) == [path for path, _ in axes]
    # The first axis varies slowest.
    assert [m.values[axes[0][0]] for m in members[:: len(members) // len(axes[0][1])]] == list(
        sweep._normalise(axes[0][0], v) for v in axes[0][1]
    )


def test_paper_sweeps_have_the_papers_values():
    vocab = sweep.expand(SWEEP_CONFIGS.get_config("vocab"))
    assert len(vocab) == 3 * 2 * 5
    assert {m.config.model.num_hidden_layers for m in vocab} == {4, 8, 12}
    assert {m.config.data.vocab_size for m in vocab} == {64, 128, 256, 512, 1024}
    parents = sweep.expand(SWEEP_CONFIGS.get_config("parents"))
    assert {m.config.data.n_parent_choices for m in parents} == {(1,), (2,), (3,)}
    assert all(
        m.config.data.num_unique_H == 100 and m.config.data.chain_length_choices == (4,)
        for m in parents
    )
    alpha = sweep.expand(SWEEP_CONFIGS.get_config("recipe_alpha"))
    assert len(alpha) == 3 * 5
    assert any("alpha_inf" in m.name for m in alpha)
    assert all(
        m.config.data.prompt_strategy == "hybrid_special_token" and m.config.train.batch_size == 16
        for m in alpha
    )
    # A swept field that the run name does not spell out is appended to the directory name.
    lrs = sweep.expand(tiny_sweep_config())
    assert [m.name.rsplit("_lr_", 1)[1] for m in lrs] == ["0.003", "0.001"] * 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("axes", (("data.no_such_field", (1, 2)),), "names 'data.no_such_field', which is not"),
        ("axes", (("data.vocab_size", ()),), "config.sweep.axes=.* is invalid"),
        ("axes", (("data.vocab_size", (64, 5)),), r"sweep member 1 .*data.vocab_size"),
        ("packing", "tight", "config.sweep.packing='tight' is invalid"),
        ("max_pack_size", -1, "config.sweep.max_pack_size=-1 is invalid"),
    ],
)
def test_invalid_sweeps_are_rejected_before_compiling(field, value, message):
    config = tiny_sweep_config()
    if field == "axes" and "vocab" in str(value):
        config.data.prompt_strategy = "cot_special_token"
    config.sweep[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        sweep.expand(config)


def test_unknown_sweep_name_and_member_index_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="expected a sweep name, one of"):
        SWEEP_CONFIGS.get_config("nope")
    config = tiny_sweep_config()
    config.sweep.member = 4
    with pytest.raises(config_lib.ConfigError, match=r"sweep.member=4 is invalid: .* 4 members"):
        sweep.run(config, str(tmp_path / "never"))


def test_plan_packs_members_whose_programs_agree():
    config = tiny_sweep_config()
    config.sweep.axes = (
        ("data.prompt_strategy", ("cot", "standard")),
        ("seed", (1, 2, 3)),
        ("model.num_hidden_layers", (1, 2)),
    )
    members = sweep.expand(config)
    starts = {m.index: 0 for m in members}

    def shape(packs):
        return sorted(sorted(m.index for m in p) for p in packs)

    # Exact packing: same model and same sequence length (cot and standard differ).
    exact = sweep.plan(members, starts, "exact")
    assert shape(exact) == [[0, 2, 4], [1, 3, 5], [6, 8, 10], [7, 9, 11]]
    padded = sweep.plan(members, starts, "padded")
    assert shape(padded) == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
    assert shape(sweep.plan(members, starts, "off")) == [[i] for i in range(12)]
    assert [len(p) for p in sweep.plan(members, starts, "padded", max_pack_size=4)] == [4, 2, 4, 2]
    starts[4] = 10  # a member resuming from another step trains apart
    assert shape(sweep.plan(members, starts, "exact"))[0] == [0, 2]


def test_padding_a_batch_to_a_longer_pack_changes_no_loss():
    """A standard batch left-padded to cot's length gives the same loss, gradients and counts.

    Parameters after an AdamW step are not compared: Adam divides each gradient element by the
    root of its second moment, so an element near zero, whose rounding differs with the
    reduction order, can move its update by up to lr. The loss and gradients are what padding
    could change."""
    config = tiny_sweep_config()
    config.data.prompt_strategy = "standard"
    exp = experiment.setup(config)
    graphdef, state = experiment.init_state(exp)
    keys = data.root_keys(3)
    world = data.make_world(keys["world"], exp.spec)
    batch = data.sample_batch(world, keys["train"], 0, exp.spec, exp.batch_size)
    groups = ((exp.spec, (0,)),)
    padded = packed.sample_packed_batch(
        0,
        [jax.tree.map(lambda x: x[None], world)],
        [keys["train"][None]],
        groups,
        exp.spec.seq_len + 7,
        exp.batch_size,
    )
    assert padded["input_ids"].shape == (1, exp.batch_size, exp.spec.seq_len + 7)
    plain = {k: batch[k] for k in packed.BATCH_FIELDS}
    longer = {k: v[0] for k, v in padded.items()}
    step = jax.jit(lambda s, b: experiment.train_step(s, b, graphdef=graphdef, exp=exp))
    windows = [step(state, b)["window"] for b in (longer, plain)]
    for name in ("tokens", "n_cot", "n_direct", "steps"):  # counts: exactly equal
        assert int(windows[0][name]) == int(windows[1][name]), name
    grad = jax.jit(jax.value_and_grad(experiment.batch_loss), static_argnums=2)
    (loss_longer, grads_longer), (loss_plain, grads_plain) = (
        grad(state["params"], b, graphdef) for b in (longer, plain)
    )
    # The padded sums hold the same terms plus exact zeros, in another order: float32 rounding
    # of a mean over ~1e3 tokens (relative 1e-6), and of each gradient element, a sum of terms
    # up to the leaf's largest magnitude, hence an absolute bound scaled by that magnitude (an
    # element whose terms cancel has no meaningful relative error).
    np.testing.assert_allclose(loss_longer, loss_plain, rtol=1e-6)
    np.testing.assert_allclose(windows[0]["loss_sum"], loss_plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_longer), jax.tree.leaves(grads_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """The tiny sweep run by the main command, uninterrupted."""
    workdir = str(tmp_path_factory.mktemp("sweeps") / "full")
    result = run_main(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def member_dirs(workdir):
    with open(os.path.join(workdir, "sweep.json")) as f:
        return [os.path.join(workdir, m["dir"]) for m in json.load(f)["members"]]


def test_packed_members_match_training_each_alone(finished_sweep, tmp_path):
    pairs = zip(sweep.expand(tiny_sweep_config()), member_dirs(finished_sweep), strict=True)
    for member, run_dir in list(pairs)[:2]:
        alone = str(tmp_path / str(member.index))
        train.train_and_evaluate(member.config, alone)
        ours, theirs = records(run_dir), records(alone)
        assert [(r["step"], r["kind"]) for r in ours] == [(r["step"], r["kind"]) for r in theirs]
        # Packed (vmapped) and alone, the sums reduce in other orders: parameters whose
        # gradient sits at float32 rounding level can take another Adam update (up to lr), but
        # the loss hardly depends on them (their gradient is ~0), so losses stay within ~1e-5.
        for a, b in zip(ours, theirs, strict=True):
            for name in ("loss", "answer_loss"):
                if name in a:
                    assert a[name] == pytest.approx(b[name], rel=1e-4), (a["step"], name)


def test_sweep_writes_member_runs_and_the_report(finished_sweep):
    rundirs = member_dirs(finished_sweep)
    assert len(rundirs) == 4
    for run_dir in rundirs:
        with open(os.path.join(run_dir, "results.json")) as f:
            assert json.load(f)["step"] == 30
        by_k = [r for r in records(run_dir) if r["kind"] == "eval_by_k"]
        assert [r["step"] for r in by_k] == [30]
        assert {f"answer_acc_k{k}" for k in range(1, 5)} <= by_k[0].keys()
        analyses = [r for r in records(run_dir) if r["kind"] == "analysis"]
        assert [r["step"] for r in analyses] == [0, 15, 30]  # step 0: before training
        assert {"embed_probe_r2", "embed_cka", "parent_mass_query_L1H1"} <= analyses[0].keys()
        (coverage,) = [r for r in records(run_dir) if r["kind"] == "data"]
        assert coverage["step"] == 0 and 0 < coverage["token_coverage"] <= 1
        cot = rundir.load_config(run_dir).data.prompt_strategy == "cot"
        assert os.path.exists(os.path.join(run_dir, "query_attention.png")) == cot
        # Every member is a complete run of its own.
        assert rundir.load_run(run_dir).step == 30
    report = os.path.join(finished_sweep, "report")
    for name in (
        "summary.md",
        "summary.csv",
        "accuracy_vs_steps.png",
        "final_accuracy.png",
        "accuracy_vs_k.png",
        "analysis_over_steps.png",
        "dag_heatmap_0.png",
    ):
        assert os.path.getsize(os.path.join(report, name)) > 100, name


def test_relaunch_skips_finished_members_and_resumes_the_rest_exactly(finished_sweep, tmp_path):
    workdir = str(tmp_path / "killed")
    process = subprocess.Popen(
        [sys.executable, "-m", "cotlab_jax.main", f"--config={TINY_SWEEP}", f"--workdir={workdir}"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    second_pack = None
    while time.time() < deadline and process.poll() is None:
        if second_pack is None and os.path.exists(os.path.join(workdir, "sweep.json")):
            second_pack = member_dirs(workdir)[2:]
        # Both members saved step 10, so they resume together.
        if second_pack and all(
            os.path.isdir(os.path.join(d, "checkpoints", "10")) for d in second_pack
        ):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    first_pack = member_dirs(workdir)[:2]
    stamps = [os.path.getmtime(os.path.join(d, "metrics.jsonl")) for d in first_pack]

    result = run_main(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 members, 2 ended, 2 to train in 1 program(s)" in result.stdout
    assert stamps == [os.path.getmtime(os.path.join(d, "metrics.jsonl")) for d in first_pack]
    for ours, reference in zip(member_dirs(workdir), member_dirs(finished_sweep), strict=True):
        assert records(ours) == records(reference)
    again = run_main(workdir)
    assert "4 members, 4 ended, 0 to train" in again.stdout


def test_a_damaged_member_checkpoint_takes_its_pack_back_to_their_common_step(
    finished_sweep, tmp_path
):
    """One packed member's latest checkpoint is damaged for real (its array data cut to a
    third): the relaunch sets it aside, takes both members of the pack back to the newest step
    both hold, recomputes the rest and ends with the uninterrupted sweep's records."""
    workdir = str(tmp_path / "damaged")
    shutil.copytree(finished_sweep, workdir)
    first_pack = member_dirs(workdir)[:2]
    for run_dir in first_pack:
        os.remove(os.path.join(run_dir, "results.json"))
    damaged = os.path.join(first_pack[0], "checkpoints", "30")
    for directory, _, names in os.walk(damaged):
        if os.path.basename(directory) == "d":
            for name in names:
                path = os.path.join(directory, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)

    result = run_main(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 members, 2 ended, 2 to train in 1 program(s)" in result.stdout
    # Two warning lines (the damage, the pack going back), no traceback of the failed restore's
    # abandoned reads.
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "checkpoint step 30" in result.stderr and "steps 21-30 are recomputed" in result.stderr
    assert (
        f"{first_pack[1]}: going back to step 20, the newest checkpoint that every member of "
        f"its pack has: steps 21-30 are recomputed (its newer checkpoints, 30, are removed)"
    ) in result.stderr
    for ours, reference in zip(member_dirs(workdir), member_dirs(finished_sweep), strict=True):
        assert records(ours) == records(reference)
    for run_dir in first_pack:
        assert rundir.load_run(run_dir).step == 30  # the recomputed checkpoints are whole
    assert os.listdir(os.path.join(first_pack[0], rundir.DAMAGED_DIR))
