"""OSSCAR pruning time: `python -m cotlab_jax.bench prune [--widths=1024,2048,4096,8192 ...]`.

Prunes the MLPs of randomly initialised reference-shaped Llamas (hidden 2048, 32 heads / 8 KV
heads of 64; `--layers` of them) to `--mlp_keep` of their neurons with `prune.prune_params`,
calibrated on `--tasks` tasks of the reference's default task (V=1024, 240 tokens), once per MLP
width in `--widths`, and reports per layer where the time goes: calibration (the layer forward
and the float32 Gram matrix X^T X, JAX) and the solve (the inverse of the m x m Gram, backward
selection, local search, refit; float64 NumPy). The 245M reference model is `--layers=4` at width
8192; the times grow with the width m as the Gram (n m^2) and the solve (m^3), so a few widths
give the exponent and an extrapolation.
"""

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from cotlab_jax import config as config_lib
from cotlab_jax import model, prune
from cotlab_jax.bench import positive_int


def random_model(config: model.LlamaConfig, seed: int):
    """(graphdef, state) with NumPy-random weights (the lab's init distribution, without an XLA
    compilation per parameter shape)."""
    graphdef, abstract = jax.eval_shape(functools.partial(model.init, config), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if "scale" in jax.tree_util.keystr(path):
            return np.ones(leaf.shape, np.float32)
        return rng.normal(0, config.initializer_range, leaf.shape).astype(np.float32)

    return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


def bench_width(width: int, batch, args) -> dict:
    config = model.LlamaConfig(
        vocab_size=1024,
        num_hidden_layers=args.layers,
        hidden_size=2048,
        intermediate_size=width,
        dtype=args.dtype,
    )
    graphdef, state = random_model(config, 0)
    start = time.perf_counter()
    result = prune.prune_params(
        config,
        graphdef,
        state,
        batch,
        mlp_keep=args.mlp_keep,
        method=args.method,
        chunk_size=args.chunk_size,
    )
    total = time.perf_counter() - start
    layers = [
        layer["mlp"] | {"calibration_seconds": layer["mlp_calibration_seconds"]}
        for layer in result.report["layers"]
    ]

    def per_layer(name):
        return float(np.median([layer.get(name, 0.0) for layer in layers]))

    return dict(
        width=width,
        layers=args.layers,
        total_seconds=total,
        calibration_seconds=per_layer("calibration_seconds"),
        solve_seconds=per_layer("solve_seconds"),
        inverse_seconds=per_layer("inverse_seconds"),
        backward_seconds=per_layer("backward_seconds"),
        local_search_seconds=per_layer("local_search_seconds"),
        local_search_iters=per_layer("local_search_iters"),
        swaps_accepted=per_layer("swaps_accepted"),
        relative_error=per_layer("relative_error"),
        params=result.report["params"],
    )


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m cotlab_jax.bench prune", description=__doc__)
    parser.add_argument(
        "--widths",
        default="1024,2048,4096,8192",
        help="comma-separated MLP widths (intermediate_size)",
    )
    parser.add_argument(
        "--layers", type=positive_int, default=1, help="model depth (4: the 245M model)"
    )
    parser.add_argument("--tasks", type=positive_int, default=128, help="calibration tasks")
    parser.add_argument("--mlp_keep", type=float, default=0.5)
    parser.add_argument("--method", default="osscar", choices=prune.METHODS)
    parser.add_argument(
        "--chunk_size", type=positive_int, default=16, help="tasks per forward call"
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(model.DTYPES))
    parser.add_argument("--out", default="bench_results/prune.json")
    args = parser.parse_args(argv[1:])
    widths = [int(w) for w in args.widths.split(",")]

    batch = prune.calibration_batch(config_lib.get_base_config(), args.tasks)
    tokens = int(np.sum(batch["attention_mask"]))
    rows = []
    for width in widths:
        rows.append(bench_width(width, batch, args))
        print(f"width {width}: {json.dumps(rows[-1])}", flush=True)
    for previous, row in zip(rows, rows[1:], strict=False):
        ratio = np.log(row["width"] / previous["width"])
        row["calibration_exponent"] = float(
            np.log(row["calibration_seconds"] / previous["calibration_seconds"]) / ratio
        )
        row["solve_exponent"] = float(
            np.log(row["solve_seconds"] / previous["solve_seconds"]) / ratio
        )

    device = jax.devices()[0]
    print(
        f"{device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs; "
        f"{args.tasks} tasks = {tokens} tokens, depth {args.layers}, hidden 2048, "
        f"{args.method} keeping {args.mlp_keep} of the MLP neurons; seconds per layer"
    )
    header = (
        f"{'width':>6} {'calib s':>8} {'solve s':>8} {'(inverse':>9} {'backward':>9} "
        f"{'local)':>7} {'swaps':>7} {'rel err':>8} {'total s':>8} "
        f"{'calib ~m^':>9} {'solve ~m^':>9}"
    )
    print(header)
    for r in rows:
        exponents = (
            f"{r['calibration_exponent']:9.2f} {r['solve_exponent']:9.2f}"
            if "solve_exponent" in r
            else f"{'-':>9} {'-':>9}"
        )
        print(
            f"{r['width']:6d} {r['calibration_seconds']:8.1f} {r['solve_seconds']:8.1f} "
            f"{r['inverse_seconds']:9.1f} {r['backward_seconds']:9.1f} "
            f"{r['local_search_seconds']:7.1f} "
            f"{r['swaps_accepted']:3.0f}/{r['local_search_iters']:<3.0f} "
            f"{r['relative_error']:8.4f} {r['total_seconds']:8.1f} {exponents}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(
                benchmark="prune",
                backend=jax.default_backend(),
                device_kind=device.device_kind,
                host=platform.node(),
                cpu_count=os.cpu_count(),
                tokens=tokens,
                flags=vars(args),
                rows=rows,
            ),
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":  # also `python -m cotlab_jax.bench.prune`
    main(sys.argv)
