"""Distillation: the loss against its closed form, a student that starts as the teacher, on-policy
sampling, and a distillation run killed and resumed."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotlab_jax import data, decode, distill, experiment, model, train
from cotlab_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tests", "configs")
TIMING = ("tokens_per_s", "step_time_s")


def load_config(name, arg=None):
    sys.path.insert(0, CONFIGS)
    try:
        module = __import__(name)
    finally:
        sys.path.pop(0)
    return module.get_config(*([arg] if arg else []))


def student_experiment(stage="word", same_model_as_teacher=False, **distill_fields):
    teacher_config = load_config("tiny")
    config = distill.student_config(load_config("tiny_distill", stage), teacher_config)
    if same_model_as_teacher:
        config.model = teacher_config.model
    config.distill.update(distill_fields)
    return experiment.setup(config)


def numpy_kl(student, teacher, mask, temperature):
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over `mask`, in float64."""

    def log_softmax(x):
        x = np.asarray(x, np.float64) / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_t, log_s = log_softmax(teacher), log_softmax(student)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1) * temperature**2
    return kl[np.asarray(mask)].mean()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_distillation_kl_matches_its_closed_form(temperature):
    rng = np.random.default_rng(int(temperature * 10))
    student = rng.normal(size=(3, 6, 11)).astype(np.float32) * 3
    teacher = rng.normal(size=(3, 6, 11)).astype(np.float32) * 3
    mask = rng.random((3, 6)) < 0.5
    mask[0, 0] = True
    got = distill.distillation_kl(
        jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask), temperature
    )
    np.testing.assert_allclose(got, numpy_kl(student, teacher, mask, temperature), rtol=1e-5)
    # Masked positions do not count, whatever their logits.
    changed = student.copy()
    changed[~mask] = rng.normal(size=changed[~mask].shape) * 50
    assert (
        distill.distillation_kl(
            jnp.asarray(changed), jnp.asarray(teacher), jnp.asarray(mask), temperature
        )
        == got
    )
    # Zero when the student is the teacher; no position at all gives 0, not NaN.
    assert (
        distill.distillation_kl(
            jnp.asarray(teacher), jnp.asarray(teacher), jnp.asarray(mask), temperature
        )
        == 0
    )
    assert (
        distill.distillation_kl(
            jnp.asarray(student), jnp.asarray(teacher), jnp.zeros((3, 6), bool), temperature
        )
        == 0
    )


def test_word_level_loss_mixes_cross_entropy_and_kl_over_labelled_tokens():
    exp = student_experiment("word", kl_weight=0.3, temperature=2.0)
    teacher_exp = student_experiment("word", same_model_as_teacher=True)
    graphdef, params = model.init(exp.model_config, jax.random.key(1))
    teacher_graphdef, teacher_params = model.init(teacher_exp.model_config, jax.random.key(2))
    world = data.make_world(data.root_keys(exp.config.seed)["world"], exp.spec)
    batch = data.sample_batch(world, jax.random.key(3), 0, exp.spec, exp.batch_size)
    loss, (ce, kl) = jax.jit(
        functools.partial(
            distill.word_level_loss,
            graphdef=graphdef,
            teacher_graphdef=teacher_graphdef,
            distill_cfg=exp.config.distill,
        )
    )(params, teacher_params, batch)

    inputs = (batch["input_ids"], batch["positions"], batch["attention_mask"])
    student = np.asarray(model.apply(graphdef, params, *inputs), np.float64)
    teacher = np.asarray(model.apply(teacher_graphdef, teacher_params, *inputs), np.float64)
    labels = np.asarray(batch["labels"])
    # Position t's logits predict the label at t + 1.
    predicted = labels[:, 1:] != data.IGNORE_INDEX
    log_p = student[:, :-1] - student[:, :-1].max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_p, np.where(predicted, labels[:, 1:], 0)[..., None], -1)[..., 0]
    expected_ce = -picked[predicted].mean()
    expected_kl = numpy_kl(student[:, :-1], teacher[:, :-1], predicted, 2.0)
    np.testing.assert_allclose(ce, expected_ce, rtol=1e-5)
    np.testing.assert_allclose(kl, expected_kl, rtol=1e-4)
    np.testing.assert_allclose(loss, 0.7 * expected_ce + 0.3 * expected_kl, rtol=1e-4)


def run_steps(exp, teacher_graphdef, teacher_params, n_steps):
    """`n_steps` distillation steps of a student that starts as the teacher; the states' params
    before and after, and the largest |gradient| entry along the way."""
    graphdef, state = experiment.init_state(exp)
    shardings = jax.tree.map(lambda x: x.sharding, state["params"])
    state = dict(state, params=jax.device_put(jax.tree.map(jnp.copy, teacher_params), shardings))
    world = data.make_world(data.root_keys(exp.config.seed)["world"], exp.spec)
    train_key = data.root_keys(exp.config.seed)["train"]
    step = distill.compile_distill_step(exp, graphdef, state, teacher_graphdef)
    grad = jax.jit(
        jax.grad(
            functools.partial(
                distill.word_level_loss,
                graphdef=graphdef,
                teacher_graphdef=teacher_graphdef,
                distill_cfg=exp.config.distill,
            ),
            has_aux=True,
        )
    )
    largest = 0.0
    for _ in range(n_steps):
        batch = experiment.sample_train_batch(state, world, train_key, exp)
        grads, _ = grad(state["params"], teacher_params, batch)
        largest = max(largest, max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)))
        state = step(state, teacher_params, world, train_key)
    return state["params"], largest


def test_a_student_copy_of_the_teacher_stays_there():
    """With kl_weight=1 the loss is the KL to the teacher, minimal (0) at the teacher: gradients
    vanish up to float32 rounding (the student's and the teacher's forward passes are compiled
    apart). Adam's update is lr * m/(sqrt(v) + eps) with |m| <= max|g|, so after n steps no
    parameter moved more than n * lr * max|g| / eps (weight decay off: it would move them)."""
    n_steps, lr, eps = 3, 3e-3, 1e-3
    exp = student_experiment("word", same_model_as_teacher=True, kl_weight=1.0, temperature=2.0)
    exp.config.train.update(dict(weight_decay=0.0, eps=eps, lr=lr))
    with jax.set_mesh(exp.mesh):  # the teacher on the student's mesh, as `distill` loads it
        teacher_graphdef, teacher_params = model.init_sharded(
            exp.model_config, jax.random.key(5), exp.mesh
        )
    kept = jax.tree.map(np.asarray, teacher_params)
    params, largest_grad = run_steps(exp, teacher_graphdef, teacher_params, n_steps)
    assert largest_grad < 1e-5
    bound = n_steps * lr * largest_grad / eps
    moved = max(
        float(np.abs(np.asarray(p) - k).max())
        for p, k in zip(jax.tree.leaves(params), jax.tree.leaves(kept), strict=True)
    )
    assert moved <= bound + 1e-7, (moved, bound)
    # The teacher's parameters are an argument, never donated: they are still there, unchanged.
    for p, k in zip(jax.tree.leaves(teacher_params), jax.tree.leaves(kept), strict=True):
        np.testing.assert_array_equal(np.asarray(p), k)
    # The cross-entropy part does move the same student (the bound is not vacuous).
    exp.config.distill.kl_weight = 0.0
    params, _ = run_steps(exp, teacher_graphdef, teacher_params, n_steps)
    moved = max(
        float(np.abs(np.asarray(p) - k).max())
        for p, k in zip(jax.tree.leaves(params), jax.tree.leaves(kept), strict=True)
    )
    assert moved > 100 * (bound + 1e-7)


def test_on_policy_samples_are_reproducible_and_the_kl_covers_generated_tokens_only():
    exp = student_experiment("mixed", temperature=1.5)
    graphdef, params = model.init(exp.model_config, jax.random.key(7))
    teacher_graphdef, teacher_params = model.init(
        student_experiment("word", same_model_as_teacher=True).model_config, jax.random.key(8)
    )
    world = data.make_world(data.root_keys(exp.config.seed)["world"], exp.spec)
    batch = data.sample_batch(world, jax.random.key(9), 0, exp.spec, exp.batch_size)
    n_new = distill.generation_length(exp.spec, exp.config)
    sequence = jax.jit(distill.on_policy_sequence, static_argnums=(3, 4, 5, 6))

    def sample(step, temperature=0.85):
        _, key = distill.step_keys(exp.config.seed, step)
        return sequence(params, batch, key, graphdef, exp.spec, n_new, temperature)

    first, again, other = sample(4), sample(4), sample(5)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["input_ids"], other["input_ids"])
    draws = [float(distill.step_keys(exp.config.seed, s)[0]) for s in range(64)]
    assert draws == [float(distill.step_keys(exp.config.seed, s)[0]) for s in range(64)]
    assert 0.3 < np.mean(np.asarray(draws) < 0.5) < 0.7

    # Near zero temperature, sampling is greedy decoding (an independent KV-cache decoder).
    greedy = sample(4, temperature=1e-6)
    tokens, _, _ = decode.greedy_decode(
        graphdef, params, batch["query_ids"], batch["query_mask"], n_new
    )
    query_len = batch["query_ids"].shape[1]
    np.testing.assert_array_equal(greedy["input_ids"][:, query_len:], tokens)

    # The KL is over the positions that predict a generated token: query_len - 1 .. end - 1.
    loss_mask = np.asarray(first["loss_mask"])
    expected = np.zeros_like(loss_mask)
    expected[:, query_len - 1 : query_len + n_new - 1] = True
    np.testing.assert_array_equal(loss_mask, expected)
    kl, _ = jax.jit(
        functools.partial(
            distill.on_policy_loss,
            graphdef=graphdef,
            teacher_graphdef=teacher_graphdef,
            distill_cfg=exp.config.distill,
        )
    )(params, teacher_params, first)
    inputs = (first["input_ids"], first["positions"], first["attention_mask"])
    student = model.apply(graphdef, params, *inputs)
    teacher = model.apply(teacher_graphdef, teacher_params, *inputs)
    np.testing.assert_allclose(kl, numpy_kl(student, teacher, expected, 1.5), rtol=1e-4)


def test_sampling_stops_a_row_at_its_eos():
    exp = student_experiment("mixed")
    graphdef, params = model.init(exp.model_config, jax.random.key(11))
    world = data.make_world(data.root_keys(exp.config.seed)["world"], exp.spec)
    batch = data.sample_batch(world, jax.random.key(12), 0, exp.spec, exp.batch_size)
    args = (graphdef, params, batch["query_ids"], batch["query_mask"], jax.random.key(0), 6, 1e-6)
    free, valid = distill.sample_continuations(*args)
    assert np.asarray(valid).all()
    eos = int(free[0, 1])  # row 0 ends at its second token
    tokens, valid = distill.sample_continuations(*args, eos_id=eos, pad_id=-1)
    tokens, valid, free = np.asarray(tokens), np.asarray(valid), np.asarray(free)
    for row in range(tokens.shape[0]):
        hits = np.flatnonzero(free[row] == eos)
        length = hits[0] + 1 if hits.size else 6
        np.testing.assert_array_equal(valid[row], np.arange(6) < length)
        np.testing.assert_array_equal(tokens[row, :length], free[row, :length])
        assert (tokens[row, length:] == -1).all()


# ---------------------------------------------------------------------------------------------
# End to end.


def records(workdir):
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
    ]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny teacher trained for a few steps (its quality does not matter here)."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    config = load_config("tiny")
    config.train.n_tasks = 8 * 10
    config.log.tensorboard = False
    train.train_and_evaluate(config, workdir)
    return workdir


def distill_command(teacher, workdir):
    return [
        sys.executable,
        "-m",
        "cotlab_jax.distill",
        f"--teacher={teacher}",
        f"--config={os.path.join(CONFIGS, 'tiny_distill.py')}",
        f"--workdir={workdir}",
        "--config.log.tensorboard=False",
    ]


def run_distill(teacher, workdir, *overrides):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        distill_command(teacher, workdir) + list(overrides),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result


def test_a_killed_distillation_resumes_as_an_uninterrupted_one(teacher_run, tmp_path):
    # Both runs are processes of one device each (this one has 8: other reduction orders).
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    result = run_distill(teacher_run, full)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher (" in result.stdout
    with open(os.path.join(full, "teacher.json")) as f:
        assert 0 <= json.load(f)["eval"]["answer_acc"] <= 1
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.Popen(
        distill_command(teacher_run, killed),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(os.path.join(killed, "checkpoints", "10")):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    result = run_distill(teacher_run, killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert records(killed) == records(full)
    assert any(r["kind"] == "eval" and r["step"] == 30 for r in records(full))


def test_invalid_distill_config_is_one_line(teacher_run, tmp_path):
    result = run_distill(teacher_run, str(tmp_path / "bad"), "--config.distill.kl_weight=1.5")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.distill.kl_weight=1.5 is invalid: expected a number in [0, 1]."
    )
