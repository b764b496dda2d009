"""End-to-end step time: `python -m cotlab_jax.bench train [--config=configs/<file>.py] [...]`.

Times, in one run and interleaved, (a) the training loop's step (sample the batch on device, then
forward, backward and AdamW) and (b) the same train step on a batch sampled beforehand, and
reports the overhead of sampling inside the step: (a) / (b) - 1.
"""

import argparse
import importlib.util
import json
import os
import time

import jax
import numpy as np

from cotlab_jax import cli_errors, data, experiment
from cotlab_jax.bench import positive_int


def load_config(path: str):
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


@cli_errors.one_line  # a missing --config file ends in one line
def main(argv):
    parser = argparse.ArgumentParser(prog="python -m cotlab_jax.bench train")
    parser.add_argument("--config", default="configs/quickstart.py")
    parser.add_argument(
        "--batch_size", type=positive_int, default=None, help="overrides the config's"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=7, help="timed rounds; medians count"
    )
    parser.add_argument("--steps", type=positive_int, default=5, help="steps per timed round")
    parser.add_argument("--out", default="bench_results/train.json")
    args = parser.parse_args(argv[1:])

    config = load_config(args.config)
    if args.batch_size:
        config.train.batch_size = args.batch_size
    exp = experiment.setup(config)
    keys = data.root_keys(config.seed)
    world = data.make_world(keys["world"], exp.spec)
    with jax.set_mesh(exp.mesh):
        graphdef, state = experiment.init_state(exp)
        sampled = experiment.compile_train_step(exp, graphdef, state)
        presampled = jax.jit(
            lambda s, b: experiment.train_step(s, b, graphdef=graphdef, exp=exp), donate_argnums=0
        )
        batch = jax.jit(lambda s: experiment.sample_train_batch(s, world, keys["train"], exp))(
            state
        )

        def time_steps(fn):
            nonlocal state
            start = time.perf_counter()
            for _ in range(args.steps):
                state = fn(state)
            jax.block_until_ready(state)
            return (time.perf_counter() - start) / args.steps

        def run_sampled(s):
            return sampled(s, world, keys["train"])

        def run_presampled(s):
            return presampled(s, batch)

        for fn in (run_sampled, run_presampled):  # compile and warm up
            time_steps(fn)
        times = {"sampled": [], "presampled": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            times["sampled"].append(time_steps(run_sampled))
            times["presampled"].append(time_steps(run_presampled))

    median = {name: float(np.median(t)) for name, t in times.items()}
    tokens = config.train.batch_size * exp.spec.seq_len
    overhead = median["sampled"] / median["presampled"] - 1
    device = jax.devices()[0]
    print(
        f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}); "
        f"config {args.config}; batch {config.train.batch_size} x {exp.spec.seq_len} tokens; "
        f"median of {args.repeats} rounds of {args.steps} steps"
    )
    print(f"{'step':34s} {'ms/step':>9s} {'tokens/s':>11s}")
    for name, label in (
        ("sampled", "sample on device + train (loop)"),
        ("presampled", "train on a presampled batch"),
    ):
        print(f"{label:34s} {median[name] * 1e3:9.1f} {tokens / median[name]:11,.0f}")
    print(f"sampling overhead: {overhead * 100:+.1f}%")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(
                benchmark="train",
                config=args.config,
                backend=jax.default_backend(),
                device_kind=device.device_kind,
                device_count=jax.device_count(),
                batch_size=config.train.batch_size,
                seq_len=exp.spec.seq_len,
                seconds_per_step=median,
                samples=times,
                overhead=overhead,
            ),
            f,
            indent=2,
        )
    print(f"wrote {args.out}")
