"""The same training on 1 device, on 8 devices with several mesh shapes, and on 2 processes."""

import os
import socket
import subprocess

import jax
import numpy as np
import pytest
from test_train import ROOT, main_command, records, run_main, tiny_config

from cotlab_jax import data, experiment, sharding

MESHES = [dict(data=8), dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)]


def step_losses(config, mesh_axes, devices, n_steps=4):
    exp = experiment.setup(config, sharding.make_mesh({"data": 1, **mesh_axes}, devices=devices))
    world, key = jax.jit(lambda: (
        data.make_world(data.root_keys(config.seed)["world"], exp.spec),
        data.root_keys(config.seed)["train"]),
        out_shardings=jax.sharding.NamedSharding(exp.mesh, jax.P()))()
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


def test_two_processes_match_one_and_resume_in_one(tmp_path):
    steps = "--config.train.n_tasks=160"  # 20 steps
    single = str(tmp_path / "single")
    run_main(single, steps)
    double = str(tmp_path / "double")
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    processes = [subprocess.Popen(
        main_command(double, steps, f"--coordinator_address=localhost:{port}",
                     "--num_processes=2", f"--process_id={i}"),
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]

    def compare(a, b):
        assert [(r["step"], r["kind"]) for r in a] == [(r["step"], r["kind"]) for r in b]
        for x, y in zip(a, b, strict=True):
            for name, value in x.items():
                if isinstance(value, float):
                    assert value == pytest.approx(y[name], rel=1e-4, abs=1e-6), (x, name)

    compare(records(double), records(single))
    # The 2-process checkpoint resumes in one process, and goes on as one process would have.
    run_main(double, "--config.train.n_tasks=320")
    longer = str(tmp_path / "longer")
    run_main(longer, "--config.train.n_tasks=320")
    compare(records(double), records(longer))
