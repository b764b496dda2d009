"""The same training on 1 device, on 8 devices with several mesh shapes, and in 2 processes; a run
moves between device counts (evaluated, exported and resumed on others than trained it)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import ROOT, main_command, records, tiny_config

from cotlab_jax import data, experiment, sharding
from cotlab_jax.export import WEIGHTS_NAME as WEIGHTS
from cotlab_jax.metrics import read_metrics

MESHES = [dict(data=8), dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)]


def step_losses(config, mesh_axes, devices, n_steps=4):
    exp = experiment.setup(config, sharding.make_mesh({"data": 1, **mesh_axes}, devices=devices))
    world, key = jax.jit(
        lambda: (
            data.make_world(data.root_keys(config.seed)["world"], exp.spec),
            data.root_keys(config.seed)["train"],
        ),
        out_shardings=jax.sharding.NamedSharding(exp.mesh, jax.P()),
    )()
    losses = []
    with jax.set_mesh(exp.mesh):
        graphdef, state = experiment.init_state(exp)
        step = experiment.compile_train_step(exp, graphdef, state)
        for _ in range(n_steps):
            state = step(state, world, key)
            losses.append(float(state["window"]["loss_sum"]))  # window of one step
    return np.array(losses), state


def test_same_losses_on_one_and_eight_devices():
    config = tiny_config()
    config.model.update(num_attention_heads=4, num_key_value_heads=2)  # tensor=2 shards heads
    config.train.log_every_n_steps = 1
    one, _ = step_losses(config, {}, jax.devices()[:1])
    for mesh_axes in MESHES:
        losses, state = step_losses(config, mesh_axes, jax.devices()[:8])
        np.testing.assert_allclose(losses, one, rtol=2e-5, err_msg=str(mesh_axes))
        assert len(losses) == 4 and losses[-1] < losses[0]
        shardings = {leaf.sharding.spec for leaf in jax.tree.leaves(state["params"])}
        if "tensor" in mesh_axes or "fsdp" in mesh_axes:
            assert any(spec != jax.P() for spec in shardings), mesh_axes  # really sharded


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def on_devices(n_devices: int) -> dict:
    """The environment of a process that sees `n_devices` CPU devices."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
    )


def run_on(n_devices, workdir, *overrides):
    result = subprocess.run(
        main_command(workdir, *overrides),
        cwd=ROOT,
        env=on_devices(n_devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def compare(a, b):
    """Same records, numbers equal up to what another device count's reduction order changes:
    every step rounds its sums differently (float32, ~1e-7 relative); Adam can move a parameter
    whose gradient is at that rounding level by up to lr, but such a parameter hardly moves the
    loss (its gradient is ~0), so logged numbers stay within ~1e-5 of each other."""
    assert [(r["step"], r["kind"]) for r in a] == [(r["step"], r["kind"]) for r in b]
    for x, y in zip(a, b, strict=True):
        for name, value in x.items():
            if isinstance(value, float):
                assert value == pytest.approx(y[name], rel=1e-4, abs=1e-6), (x, name)


def test_a_run_moves_between_device_counts(tmp_path):
    """Trained on 4 devices (fsdp=4), as in 2 processes; evaluated and exported on 1 device;
    resumed on 2 devices (fsdp=2, its checkpoint resharded): it goes on as an uninterrupted
    one-device run does."""
    steps = "--config.train.n_tasks=160"  # 20 steps
    four = str(tmp_path / "four")
    run_on(4, four, steps, "--config.mesh.fsdp=4")
    double = str(tmp_path / "double")
    port = free_port()
    processes = [
        subprocess.Popen(
            main_command(
                double,
                steps,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=on_devices(1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    compare(records(double), records(four))

    # Evaluation and export read the 4-device checkpoint on one device.
    evaluation = subprocess.run(
        [sys.executable, "-m", "cotlab_jax.evaluate", f"--workdir={four}"],
        cwd=ROOT,
        env=on_devices(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    metrics = json.loads(evaluation.stdout)["metrics"]
    with open(os.path.join(four, "results.json")) as f:
        logged = json.load(f)["eval"]
    assert metrics["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    # Greedy decoding may break a near-tie the other way: at most one task of the 24.
    assert metrics["answer_acc"] == pytest.approx(logged["answer_acc"], abs=1 / 24 + 1e-9)
    hf_dir = str(tmp_path / "hf")
    export = subprocess.run(
        [sys.executable, "-m", "cotlab_jax.export", f"--workdir={four}", f"--out={hf_dir}"],
        cwd=ROOT,
        env=on_devices(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert "step 20" in export.stdout and os.path.getsize(os.path.join(hf_dir, WEIGHTS)) > 0

    more = "--config.train.n_tasks=320"
    trained = read_metrics(os.path.join(four, "metrics.jsonl"))
    # Training longer changes train.n_tasks, which a relaunch refuses unless asked; the mesh may
    # always change.
    run_on(2, four, more, "--config.mesh.fsdp=2", "--allow_config_change")
    # Resumed, not restarted: the first 20 steps' records are kept, timings included.
    assert read_metrics(os.path.join(four, "metrics.jsonl"))[: len(trained)] == trained
    longer = str(tmp_path / "longer")
    run_on(1, longer, more)
    compare(records(four), records(longer))
