"""Task sampler throughput: `python -m cotlab_jax.bench sampler [--batch_size=1024 ...]`.

Times `data.sample_batch` (jitted, on the default device) for the reference's default task at C=4
with CoT prompts and for the special-token strategies with variable choices, and, in the same
run, the per-example NumPy reference (`cotlab_jax.numpy_reference`), so the ratio is measured
side by side.
"""

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from cotlab_jax import config as config_lib
from cotlab_jax import data, numpy_reference
from cotlab_jax.bench import positive_int

RECIPE = {"type": "power_law", "initial_prob": 0.0, "final_prob": 1.0, "alpha": 1.0, "scale": 1.0}

# name -> config.data overrides of the reference's default task (V=1024, N=M=4, C=2, K=40,
# standard); the first case keeps the C=4 `cot` shape this benchmark has always timed.
CASES = {
    "default cot (V=1024 N=M=C=4 K=40)": dict(prompt_strategy="cot", chain_length_choices=(4,)),
    "cot_special_token, variable n/m/c/k": dict(
        prompt_strategy="cot_special_token",
        n_input_choices=(3, 4),
        n_parent_choices=(3, 4),
        chain_length_choices=(2, 3, 4),
        n_example_choices=(30, 40),
    ),
    "hybrid_special_token, variable n/m/c/k": dict(
        prompt_strategy="hybrid_special_token",
        n_input_choices=(3, 4),
        n_parent_choices=(3, 4),
        chain_length_choices=(3, 4),
        n_example_choices=(30, 40),
        cot_example_prob_recipe_info=RECIPE,
        ablation_fixed_H=True,
        num_unique_H=1,
    ),
}


def spec_for(overrides) -> data.TaskSpec:
    config = config_lib.get_base_config()
    config.data.update(overrides)
    return data.TaskSpec.from_config(config)


def time_jax(spec, batch_size, repeats):
    keys = data.root_keys(0)
    world = data.make_world(keys["world"], spec)
    start = time.perf_counter()
    jax.block_until_ready(data.sample_batch(world, keys["train"], 0, spec, batch_size))
    compile_s = time.perf_counter() - start
    seconds = []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(data.sample_batch(world, keys["train"], step, spec, batch_size))
        seconds.append(time.perf_counter() - start)
    return batch_size / float(np.median(seconds)), compile_s


def time_numpy(spec, n_tasks, repeats):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(spec.vocab_size, spec.n_dims)).astype(np.float32)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n_tasks):
            numpy_reference.sample_task(rng, spec, embeddings)
        seconds.append(time.perf_counter() - start)
    return n_tasks / float(np.median(seconds))


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m cotlab_jax.bench sampler")
    parser.add_argument(
        "--batch_size", type=positive_int, default=1024, help="tasks per jitted call"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=7, help="timed calls; the median counts"
    )
    parser.add_argument(
        "--numpy_tasks", type=positive_int, default=20, help="tasks per NumPy repeat"
    )
    parser.add_argument("--numpy_repeats", type=positive_int, default=3)
    parser.add_argument("--out", default="bench_results/sampler.json")
    args = parser.parse_args(argv[1:])

    device = jax.devices()[0]
    rows = []
    for name, overrides in CASES.items():
        spec = spec_for(overrides)
        jax_rate, compile_s = time_jax(spec, args.batch_size, args.repeats)
        numpy_rate = time_numpy(spec, args.numpy_tasks, args.numpy_repeats)
        rows.append(
            dict(
                case=name,
                jax_tasks_per_s=jax_rate,
                numpy_tasks_per_s=numpy_rate,
                speedup=jax_rate / numpy_rate,
                compile_s=compile_s,
                seq_len=spec.seq_len,
            )
        )

    print(
        f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"batch {args.batch_size}, median of {args.repeats}"
    )
    header = (
        f"{'case':42s} {'jax tasks/s':>12s} {'numpy tasks/s':>14s} {'ratio':>8s} {'compile s':>10s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['case']:42s} {r['jax_tasks_per_s']:12,.0f} {r['numpy_tasks_per_s']:14,.1f} "
            f"{r['speedup']:7,.0f}x {r['compile_s']:10.1f}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(
                benchmark="sampler",
                backend=jax.default_backend(),
                device_kind=device.device_kind,
                device_count=jax.device_count(),
                host=platform.node(),
                cpu_count=os.cpu_count(),
                batch_size=args.batch_size,
                repeats=args.repeats,
                rows=rows,
            ),
            f,
            indent=2,
        )
    print(f"wrote {args.out}")
