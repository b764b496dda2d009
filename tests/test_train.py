"""End-to-end training runs: the main command, exact resumption, preemption, failures."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cotlab_jax import config as config_lib
from cotlab_jax import data, evaluate, experiment, rundir, train
from cotlab_jax.evaluate import cli as evaluate_cli
from cotlab_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.py")
TIMING = ("tokens_per_s", "step_time_s")


def tiny_config(strategy="cot"):
    sys.path.insert(0, os.path.dirname(TINY))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    return tiny.get_config(strategy)


def main_command(workdir, *overrides, strategy=None):
    config = TINY + (f":{strategy}" if strategy else "")
    return [
        sys.executable,
        "-m",
        "cotlab_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *overrides,
    ]


def run_main(workdir, *overrides, strategy=None, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        main_command(workdir, *overrides, strategy=strategy),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(workdir):
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted run of the main command, shared by the tests below."""
    workdir = str(tmp_path_factory.mktemp("runs") / "full")
    run_main(workdir)
    return workdir


def test_run_directory_and_metrics(finished_run):
    for name in (
        "config.json",
        "metrics.jsonl",
        "eval_set.npz",
        "results.json",
        "checkpoints",
        "tb",
    ):
        assert os.path.exists(os.path.join(finished_run, name)), name
    recs = records(finished_run)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(5, 41, 5))
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.3
    assert all(r["n_cot"] > 0 and r["n_direct"] == 0 for r in train_recs)
    eval_recs = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in eval_recs] == [0, 20, 40]  # step 0: before training
    with open(os.path.join(finished_run, "results.json")) as f:
        results = json.load(f)
    assert results["step"] == 40
    assert results["eval"] == {k: v for k, v in eval_recs[-1].items() if k not in ("step", "kind")}
    assert results["run_name"].startswith("llama_L_2_") and "prompt_cot" in results["run_name"]


def test_final_eval_matches_the_checkpoint(finished_run):
    """The logged evaluation is what the saved parameters give on the saved eval set."""
    run = rundir.load_run(finished_run)
    assert run.step == 40
    eval_set = data.load_eval_set(os.path.join(finished_run, "eval_set.npz"), run.spec)
    again = evaluate.evaluate(
        run.graphdef,
        run.params,
        eval_set,
        run.spec,
        batch_size=run.config.eval.batch_size,
        max_pred_tokens=run.config.eval.max_pred_tokens,
    )
    with open(os.path.join(finished_run, "results.json")) as f:
        logged = json.load(f)["eval"]
    assert again.keys() == logged.keys()
    for name in logged:
        np.testing.assert_allclose(again[name], logged[name], rtol=1e-6, err_msg=name)


def test_resume_after_kill_reproduces_the_uninterrupted_run(finished_run, tmp_path):
    workdir = str(tmp_path / "killed")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.Popen(
        main_command(workdir),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    checkpoints = os.path.join(workdir, "checkpoints")
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(os.path.join(checkpoints, "10")):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    run_main(workdir)
    assert records(workdir) == records(finished_run)
    # Relaunching a finished run changes nothing.
    run_main(workdir)
    assert records(workdir) == records(finished_run)


def test_sigterm_saves_and_exits_cleanly(finished_run, tmp_path):
    workdir = str(tmp_path / "preempted")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.Popen(
        main_command(workdir, "--config.train.n_tasks=8000"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.isdir(os.path.join(workdir, "checkpoints", "10")):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert "Preempted (SIGTERM) at step" in out
    step = int(out.split("Preempted (SIGTERM) at step ")[1].split(";")[0])
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert saved[-1] == step > 10
    assert max(r["step"] for r in records(workdir)) <= step


# Runs the main command in a process that sends itself SIGTERM while the loop reads step 15's
# training window (its third log step, not a checkpoint step): the moment a signal lands when
# a step's blocking reads wait on the device.
_SIGTERM_AT_STEP_15 = """
import os, runpy, signal, sys
import jax
real_device_get, reads = jax.device_get, []
def device_get(tree):
    host = real_device_get(tree)
    if isinstance(tree, dict) and "nonfinite_step" in tree:
        reads.append(1)
        if len(reads) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    return host
jax.device_get = device_get
sys.argv = ["main"] + sys.argv[1:]
runpy.run_module("cotlab_jax.main", run_name="__main__")
"""


def test_sigterm_landing_mid_step_saves_the_step_it_reports(tmp_path):
    workdir = str(tmp_path / "preempted")
    result = subprocess.run(
        [sys.executable, "-c", _SIGTERM_AT_STEP_15, *main_command(workdir)[3:]],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    step = int(result.stdout.split("Preempted (SIGTERM) at step ")[1].split(";")[0])
    assert step == 16  # the signal is acted on at the next step
    assert rundir.latest_checkpoint(workdir) == step
    assert max(r["step"] for r in records(workdir)) == 15  # nothing logged at 16


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config()
    config.train.lr = 1e30  # Adam steps of size lr: the loss overflows within a few steps
    config.train.checkpoint_every_n_steps = 1
    workdir = str(tmp_path / "nan")
    with pytest.raises(train.NonFiniteLossError, match="became non-finite at step") as error:
        train.train_and_evaluate(config, workdir)
    bad_step = int(str(error.value).split("at step ")[1].split(";")[0])
    run = rundir.load_run(workdir)
    assert run.step < bad_step
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(run.params))


def test_train_step_freezes_the_state_after_a_non_finite_loss():
    exp = experiment.setup(tiny_config())
    graphdef, state = experiment.init_state(exp)
    keys = data.root_keys(0)
    world = data.make_world(keys["world"], exp.spec)
    state["params"] = jax.tree.map(lambda x: x * np.nan, state["params"])
    before = jax.tree.map(np.asarray, state)
    step = jax.jit(
        lambda s: experiment.sampled_train_step(s, world, keys["train"], graphdef=graphdef, exp=exp)
    )
    after = jax.device_get(step(state))
    assert int(after["nonfinite_step"]) == 0 and int(after["step"]) == 1
    for x, y in zip(
        jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]), strict=True
    ):
        np.testing.assert_array_equal(x, y)


def test_resume_with_other_shapes_is_refused(finished_run):
    config = tiny_config()
    config.model.hidden_size = 64
    config.data.vocab_size = 40
    with pytest.raises(
        rundir.RunError,
        match=r"model\.hidden_size .*data\.vocab_size|"
        r"data\.vocab_size .*model\.hidden_size",
    ):
        train.train_and_evaluate(config, finished_run)


@pytest.mark.parametrize(
    "group, field, value, message",
    [
        ("train", "lr", -1.0, "config.train.lr=-1.0 is invalid: expected a positive number"),
        ("train", "batch_size", 0, "config.train.batch_size=0 is invalid"),
        ("train", "lr_schedule", "step", "config.train.lr_schedule='step' is invalid"),
        ("train", "b2", 1.0, r"config.train.b2=1.0 is invalid: expected a number in \[0, 1\)"),
        ("eval", "n_eval_tasks", 0, "config.eval.n_eval_tasks=0 is invalid"),
        ("model", "num_key_value_heads", 3, "num_key_value_heads"),
        ("data", "activation", "tanh", "config.data.activation='tanh' is invalid"),
        ("train", "lr", float("inf"), "config.train.lr=inf is invalid: expected a positive number"),
        (
            "train",
            "eps",
            float("nan"),
            "config.train.eps=nan is invalid: expected a positive number",
        ),
        (
            "train",
            "batch_size",
            True,
            "config.train.batch_size=True is invalid: expected a positive integer",
        ),
        (
            "train",
            "warmup_steps",
            -1,
            "config.train.warmup_steps=-1 is invalid: expected an integer >= 0",
        ),
        (
            "data",
            "data_initializer_range",
            float("inf"),
            r"config.data.data_initializer_range=inf is invalid: "
            r"expected a positive number \(finite\)",
        ),
        (
            "eval",
            "example_counts",
            "1,9",
            r"config.eval.example_counts='1,9' is invalid: 9 is not an "
            r"integer in \[1, 4\]",
        ),
        (
            "eval",
            "example_counts",
            "1,1",
            "config.eval.example_counts='1,1' is invalid: every count may appear once",
        ),
        (
            "eval",
            "example_counts",
            "some",
            "config.eval.example_counts='some' is invalid: expected '', 'all' or comma-separated",
        ),
        ("mesh", "tensor", 3, r"config.mesh=\{.*\} is invalid: .*do not multiply to the"),
        ("mesh", "data", 0, r"config.mesh=\{.*\} is invalid: .*expected positive sizes"),
    ],
)
def test_invalid_config_is_rejected_before_compiling(group, field, value, message, tmp_path):
    config = tiny_config()
    config[group][field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "never"))
    assert not os.path.exists(tmp_path / "never")


def test_batch_must_divide_over_the_mesh(tmp_path):
    config = tiny_config()
    config.mesh.update(dict(data=4, fsdp=2))  # 8 devices in the tests; batch 8 fits
    experiment.setup(config)
    config.eval.batch_size = 12
    with pytest.raises(
        config_lib.ConfigError, match=r"config.eval.batch_size=12 is invalid: .*multiple of .* 8"
    ):
        experiment.setup(config)
    config = tiny_config()  # 2 heads, 1 KV head
    config.mesh.update(dict(data=4, tensor=2))
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config.model.num_key_value_heads=1 is "
        r"invalid: expected a multiple of the "
        r"mesh's tensor size, 2",
    ):
        experiment.setup(config)


def test_recipe_numbers_decide_infinity_per_field():
    config = tiny_config("hybrid_special_token")
    config.data.cot_example_prob_recipe_info["alpha"] = float("inf")  # the "no CoT" end
    experiment.setup(config)
    for key, value, message in [
        (
            "alpha",
            float("nan"),
            r"alpha=nan is invalid: expected alpha >= 0 \(inf means "
            r"no CoT\)",
        ),
        ("alpha", -1.0, "alpha=-1.0 is invalid"),
        ("scale", float("inf"), "scale=inf is invalid: expected a finite number"),
        ("final_prob", 1.5, r"final_prob=1.5 is invalid: expected a probability in \[0, 1\]"),
        ("initial_prob", "0", "initial_prob='0' is invalid"),
    ]:
        config = tiny_config("hybrid_special_token")
        config.data.cot_example_prob_recipe_info[key] = value
        with pytest.raises(
            config_lib.ConfigError, match=r"config\.data\.cot_example_prob_recipe_info\." + message
        ):
            experiment.setup(config)


def test_one_mesh_check_for_heads_batches_and_packs():
    config = tiny_config()  # 2 heads, 1 KV head, intermediate 64, batch 8, eval batch 16
    mesh = dict(replica=1, data=1, fsdp=1, tensor=1)
    config_lib.check_mesh(config, mesh)
    for axes, message in [
        (
            dict(tensor=2),
            r"config.model.num_key_value_heads=1 is invalid: expected a "
            r"multiple of the mesh's tensor size, 2",
        ),
        (
            dict(data=2, fsdp=8),
            r"config.train.batch_size=8 is invalid: expected a multiple of "
            r"the mesh's data x fsdp size, 16",
        ),
        (
            dict(replica=2),
            r"config.mesh.replica=2 is invalid: expected a divisor of the pack "
            r"size, 3",
        ),
    ]:
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.check_mesh(config, {**mesh, **axes}, n_members=3)
    config_lib.check_mesh(config, {**mesh, "replica": 2})  # a single run: no pack to divide


def test_main_command_errors_are_one_line(tmp_path):
    result = run_main(str(tmp_path / "x"), "--config.train.lr=-1.0", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.train.lr=-1.0 is invalid: expected a positive number."
    )
    assert "Traceback" not in result.stderr
    blocked = tmp_path / "file"
    blocked.write_text("")
    result = run_main(str(blocked / "run"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot write to workdir")
    with pytest.raises(rundir.RunError, match="no config.json"):
        rundir.load_run(str(tmp_path))


@pytest.fixture(scope="module")
def special_token_run(tmp_path_factory):
    """A tiny trained hybrid_special_token run, for the standalone evaluation's variants."""
    config = tiny_config("hybrid_special_token")
    config.train.n_tasks = 8 * 10
    config.eval.eval_every_n_steps = 10
    workdir = str(tmp_path_factory.mktemp("runs") / "special")
    train.train_and_evaluate(config, workdir)
    return workdir


def test_standalone_evaluation_variants(special_token_run, tmp_path):
    run = rundir.load_run(special_token_run)
    think_start = run.spec.token_id("think_start")
    plain, _ = evaluate_cli.variant_eval_set(run)
    assert (plain["query_ids"] == think_start).any()
    dropped, _ = evaluate_cli.variant_eval_set(run, drop_think="first", drop_k=run.spec.K)
    assert not (dropped["query_ids"][dropped["query_mask"]] == think_start).any()
    forced, _ = evaluate_cli.variant_eval_set(run, force="answer")
    assert (forced["query_ids"][:, -1] == run.spec.token_id("answer_start")).all()

    out = tmp_path / "variant.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cotlab_jax.evaluate",
            f"--workdir={special_token_run}",
            "--drop_think=last",
            "--drop_k=2",
            "--force=think",
            "--n_examples=5",
            f"--out={out}",
        ],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(out.read_text())
    assert written["step"] == 10 and written["variant"]["force"] == "think"
    assert written["variant"]["n_examples"] == 5
    assert {"answer_acc", "format_acc", "gen_len_p50"} <= written["metrics"].keys()
    missing = subprocess.run(
        [sys.executable, "-m", "cotlab_jax.evaluate", f"--workdir={special_token_run}", "--step=7"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "no checkpoint at step 7" in missing.stderr.strip().splitlines()[-1]


def test_standalone_evaluation_on_a_tfds_dataset(special_token_run, tmp_path):
    """The TFDS dataset of the run's config holds its frozen eval set: same metrics."""
    from cotlab_jax import tfds_builder

    run = rundir.load_run(special_token_run)
    dataset = tfds_builder.build(
        run.config, str(tmp_path / "tfds"), n_train_tasks=run.config.train.batch_size
    )
    result = evaluate_cli.run_cli(special_token_run, "latest", eval_dataset=dataset)
    with open(os.path.join(special_token_run, "results.json")) as f:
        logged = json.load(f)["eval"]
    assert result["variant"]["eval_dataset"] == dataset
    for name, value in logged.items():
        assert result["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_metrics_writer_keeps_each_step_once(tmp_path):
    """A run started afresh (killed before its step-0 checkpoint) rewrites its step-0 records;
    a resumed one, from checkpoint 0 too, keeps them and drops what came after its
    checkpoint."""
    from cotlab_jax.metrics import MetricsWriter

    def attempt(resume_step, steps):
        writer = MetricsWriter(str(tmp_path), resume_step, tensorboard=False)
        for step in steps:
            writer.write(step, "data" if step == 0 else "train", {"value": float(step)})
        writer.close()
        return [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))]

    assert attempt(None, [0, 5, 10]) == [0, 5, 10]
    assert attempt(None, [0, 5]) == [0, 5]
    assert attempt(0, [5]) == [0, 5]
    assert attempt(5, [10, 15]) == [0, 5, 10, 15]


class _KilledError(Exception):
    """Stands for a kill right after the step-0 checkpoint, before the first step."""


def _dies_at_the_first_step(exp, graphdef, state, resumed):
    def die(*args):
        raise _KilledError

    return state, die


def test_step_0_is_evaluated_and_checkpointed_once(tmp_path):
    """As the reference, a run evaluates and checkpoints its initial state before the first
    step; one killed right after resumes from checkpoint 0 without evaluating it again and
    ends with the uninterrupted run's records."""
    config = tiny_config()
    config.train.n_tasks = 8 * 20
    uninterrupted, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    train.train_and_evaluate(config, uninterrupted)
    with pytest.raises(_KilledError):
        train.train_and_evaluate(config, killed, _dies_at_the_first_step)
    assert rundir.latest_checkpoint(killed) == 0
    assert [(r["step"], r["kind"]) for r in records(killed)] == [(0, "data"), (0, "eval")]
    initial = rundir.load_run(killed, step=0).params
    _, state = experiment.init_state(experiment.setup(config))
    fresh = jax.tree.leaves(state["params"])
    for saved, made in zip(jax.tree.leaves(initial), fresh, strict=True):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(made))
    train.train_and_evaluate(config, killed)
    assert records(killed) == records(uninterrupted)
    assert [r["step"] for r in records(killed) if r["kind"] == "eval"] == [0, 20]
