"""Training fidelity: `python -m cotlab_jax.bench fidelity [--config=configs/<file>.py] [...]`.

Trains one config twice from the same initial weights on the same batches (this lab's sampler):
with this lab's jitted train step (the training loop's), and with its PyTorch twin
(`cotlab_jax.torch_twin`: HF `LlamaForCausalLM` + `torch.optim.AdamW`, as the reference trains).
Both are evaluated by this lab's evaluation on the frozen eval set at a few steps (the twin's
weights converted back with `hf_convert`). Prints the loss and answer-accuracy curves and the
wall-time ratio side by side; writes JSON.

Both run in float32 at full precision (`jax.default_matmul_precision("highest")`, torch on the
CPU). The two advance together, segment by segment between evaluations, so load on a shared
machine hits both alike; the ratio is the median over segments of their time per step. This
lab's time includes sampling the batch inside the step; the twin's batches are sampled before
its timed segment (the reference loads data in worker processes).
"""

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
import torch

from cotlab_jax import data, evaluate, experiment, torch_twin
from cotlab_jax.bench import positive_int
from cotlab_jax.bench.train import load_config


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m cotlab_jax.bench fidelity")
    parser.add_argument(
        "--config",
        default="configs/quickstart.py",
        help="a config file; its sweep axes are ignored (the quickstart's base is its CoT member)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="train steps (default: the config's); the schedule spans them",
    )
    parser.add_argument("--evals", type=positive_int, default=4, help="evaluations after step 0")
    parser.add_argument(
        "--n_eval_tasks", type=positive_int, default=None, help="overrides the config's"
    )
    parser.add_argument(
        "--torch_threads",
        type=positive_int,
        default=1,
        help="torch's intra-op threads (more spin against JAX's on a busy CPU)",
    )
    parser.add_argument("--out", default="bench_results/fidelity.json")
    args = parser.parse_args(argv[1:])

    config = load_config(args.config)
    if args.steps:
        config.train.n_tasks = args.steps * config.train.batch_size
    if args.n_eval_tasks:
        config.eval.n_eval_tasks = args.n_eval_tasks
    config.train.log_every_n_steps = 1  # the state's loss window is then the step's own loss
    exp = experiment.setup(config)
    torch.set_num_threads(args.torch_threads)
    keys = data.root_keys(config.seed)
    world = data.make_world(keys["world"], exp.spec)
    eval_set = data.build_eval_set(world, keys["eval"], exp.spec, config.eval.n_eval_tasks)
    eval_at = sorted({round(exp.total_steps * (i + 1) / args.evals) for i in range(args.evals)})

    def accuracy(graphdef, params) -> float:
        return evaluate.evaluate(
            graphdef,
            params,
            eval_set,
            exp.spec,
            batch_size=config.eval.batch_size,
            max_pred_tokens=config.eval.max_pred_tokens,
        )["answer_acc"]

    losses = {"lab": [], "torch": []}
    accuracies = {"lab": [], "torch": []}
    seconds = {"lab": [], "torch": []}  # per step, one entry per segment
    with jax.set_mesh(exp.mesh), jax.default_matmul_precision("highest"):
        graphdef, state = experiment.init_state(exp)
        twin = torch_twin.TorchTwin(
            state["params"], exp.model_config, config.train, exp.total_steps
        )
        step_fn = experiment.compile_train_step(exp, graphdef, state)
        start = time.perf_counter()
        step_fn = step_fn.lower(state, world, keys["train"]).compile()
        compile_s = time.perf_counter() - start
        accuracies["lab"].append(accuracy(graphdef, state["params"]))
        accuracies["torch"].append(accuracy(graphdef, twin.params()))
        done = 0
        for stop in eval_at:
            start = time.perf_counter()
            for _ in range(done, stop):
                state = step_fn(state, world, keys["train"])
                losses["lab"].append(float(state["window"]["loss_sum"]))
            seconds["lab"].append((time.perf_counter() - start) / (stop - done))
            batches = [
                jax.device_get(
                    data.sample_batch(world, keys["train"], step, exp.spec, exp.batch_size)
                )
                for step in range(done, stop)
            ]
            start = time.perf_counter()
            for batch in batches:
                losses["torch"].append(twin.step(batch)[0])
            seconds["torch"].append((time.perf_counter() - start) / (stop - done))
            accuracies["lab"].append(accuracy(graphdef, state["params"]))
            accuracies["torch"].append(accuracy(graphdef, twin.params()))
            done = stop

    lab_loss, torch_loss = np.array(losses["lab"]), np.array(losses["torch"])
    rel = np.abs(lab_loss - torch_loss) / np.abs(torch_loss)
    ratios = np.array(seconds["torch"]) / np.array(seconds["lab"])
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    device = jax.devices()[0]
    print(
        f"fidelity: {args.config} ({exp.spec.prompt_strategy}), {exp.total_steps} steps x "
        f"{exp.batch_size} tasks x {exp.spec.seq_len} tokens, float32 (highest); lab on "
        f"{device.device_kind} ({jax.default_backend()}), torch {torch.__version__} on the CPU "
        f"with {args.torch_threads} thread(s); answer accuracy on {config.eval.n_eval_tasks} "
        f"frozen eval tasks"
    )
    print(
        f"{'step':>6s} {'loss lab':>10s} {'loss torch':>11s} {'rel diff':>9s} "
        f"{'acc lab':>8s} {'acc torch':>10s}"
    )
    for i, step in enumerate([0] + eval_at):
        if step:
            row = f"{lab_loss[step - 1]:10.4f} {torch_loss[step - 1]:11.4f} {rel[step - 1]:9.1e}"
        else:
            row = f"{'':10s} {'':11s} {'':9s}"
        print(f"{step:6d} {row} {accuracies['lab'][i]:8.3f} {accuracies['torch'][i]:10.3f}")
    print(
        f"loss at step s is the loss of step s's batch before its update; largest relative "
        f"difference over all {exp.total_steps} steps: {rel.max():.1e}"
    )
    print(
        f"wall time per step (median of {len(ratios)} segments): lab "
        f"{median['lab'] * 1e3:.1f} ms, torch {median['torch'] * 1e3:.1f} ms; torch / lab "
        f"{float(np.median(ratios)):.2f}x (lab's compilation {compile_s:.1f} s, not counted)"
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(
                benchmark="fidelity",
                config=args.config,
                steps=exp.total_steps,
                batch_size=exp.batch_size,
                seq_len=exp.spec.seq_len,
                backend=jax.default_backend(),
                device_kind=device.device_kind,
                machine=platform.machine(),
                torch_version=torch.__version__,
                torch_threads=args.torch_threads,
                n_eval_tasks=config.eval.n_eval_tasks,
                eval_steps=[0] + eval_at,
                answer_acc=accuracies,
                loss=losses,
                max_rel_loss_diff=float(rel.max()),
                seconds_per_step=seconds,
                median_seconds_per_step=median,
                torch_over_lab=float(np.median(ratios)),
                lab_compile_s=compile_s,
            ),
            f,
            indent=2,
        )
    print(f"wrote {args.out}")
