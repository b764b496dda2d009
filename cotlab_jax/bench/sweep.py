"""Packing sweep members: `python -m cotlab_jax.bench sweep [--members=8] [...]`.

Times, in one run and interleaved, one step of R members packed into one vmapped program
(`cotlab_jax.packed`) against R steps of the same members trained one after another, each with
its own jitted step (what a sweep without packing runs), and reports the member-steps per second
of both and their ratio. The members differ in seed and learning rate, as a seed or learning-rate
sweep's do.
"""

import argparse
import json
import os
import time

import jax
import numpy as np

from cotlab_jax import data, experiment, packed
from cotlab_jax.bench import positive_int
from cotlab_jax.bench.train import load_config


def _time(fn, state, steps: int):
    start = time.perf_counter()
    for _ in range(steps):
        state = fn(state)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / steps, state


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m cotlab_jax.bench sweep")
    parser.add_argument("--config", default="configs/quickstart.py")
    parser.add_argument("--members", type=positive_int, default=8)
    parser.add_argument(
        "--hidden_size",
        type=positive_int,
        default=64,
        help="overrides the config's model width (small models gain most)",
    )
    parser.add_argument(
        "--num_hidden_layers",
        type=positive_int,
        default=None,
        help="overrides the config's model depth",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed rounds; medians count"
    )
    parser.add_argument("--steps", type=positive_int, default=3, help="steps per timed round")
    parser.add_argument("--out", default="bench_results/sweep.json")
    args = parser.parse_args(argv[1:])

    base = load_config(args.config)
    base.sweep.axes = ()
    base.model.update(
        dict(
            hidden_size=args.hidden_size,
            intermediate_size=4 * args.hidden_size,
            head_dim=args.hidden_size // base.model.num_attention_heads,
        )
    )
    if args.num_hidden_layers:
        base.model.num_hidden_layers = args.num_hidden_layers
    configs = []
    for i in range(args.members):
        config = base.copy_and_resolve_references()
        config.seed, config.train.lr = i, base.train.lr * (1 + i / args.members)
        configs.append(config)
    exps = [experiment.setup(c) for c in configs]

    with jax.set_mesh(exps[0].mesh):
        program = packed.program(exps, [], 0)
        packed_state = program.state
        singles = []
        for exp in exps:
            graphdef, state = experiment.init_state(exp)
            keys = data.root_keys(exp.config.seed)
            world = data.make_world(keys["world"], exp.spec)
            step = experiment.compile_train_step(exp, graphdef, state)
            singles.append(
                (lambda s, step=step, world=world, key=keys["train"]: step(s, world, key), state)
            )

        def run_packed(state):
            return program.step(state)

        def run_one_by_one(states):
            return [fn(s) for (fn, _), s in zip(singles, states, strict=True)]

        single_states = [s for _, s in singles]
        _, packed_state = _time(run_packed, packed_state, 1)  # compile and warm up
        _, single_states = _time(run_one_by_one, single_states, 1)
        times = {"packed": [], "one_by_one": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            seconds, packed_state = _time(run_packed, packed_state, args.steps)
            times["packed"].append(seconds)
            seconds, single_states = _time(run_one_by_one, single_states, args.steps)
            times["one_by_one"].append(seconds)

    median = {name: float(np.median(t)) for name, t in times.items()}
    member_steps = {name: args.members / seconds for name, seconds in median.items()}
    speedup = median["one_by_one"] / median["packed"]
    device = jax.devices()[0]
    print(
        f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}); "
        f"{args.members} members of config {args.config} at depth "
        f"{base.model.num_hidden_layers}, hidden {args.hidden_size}; "
        f"batch {base.train.batch_size} x {exps[0].spec.seq_len} tokens; median of "
        f"{args.repeats} rounds of {args.steps} steps"
    )
    print(f"{'members trained':26s} {'ms per step of all':>19s} {'member-steps/s':>15s}")
    for name, label in (("packed", "packed (one program)"), ("one_by_one", "one after another")):
        print(f"{label:26s} {median[name] * 1e3:19.1f} {member_steps[name]:15.1f}")
    print(f"packing speed-up: {speedup:.2f}x")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(
                benchmark="sweep",
                config=args.config,
                members=args.members,
                hidden_size=args.hidden_size,
                num_hidden_layers=base.model.num_hidden_layers,
                backend=jax.default_backend(),
                device_kind=device.device_kind,
                device_count=jax.device_count(),
                seconds_per_step=median,
                samples=times,
                speedup=speedup,
            ),
            f,
            indent=2,
        )
    print(f"wrote {args.out}")
