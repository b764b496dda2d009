"""`python -m cotlab_jax.bench quantize [--flags]`: decoding speed and bytes of quantized models.

The dense model (float32 parameters, `--dtype` compute) and its post-training quantizations
(`cotlab_jax.quantize`: w8, w4 weight-only; w8a8, fp8 weights and activations) decode the same
random prompts with KV-cache greedy decoding (`cotlab_jax.decode`), on one device. Each timed
round runs every model once, in turn, so all see the same machine load; the table has the
median over `--repeats` rounds after one compiling warm-up each, and the stored bytes of the
parameters (all, and the quantized layer weights' share). Weights are random (`model.init`), so
this measures cost, not accuracy (see tests/test_quantize.py for that).
"""

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from cotlab_jax import decode, model, quantize
from cotlab_jax.bench import positive_int
from cotlab_jax.bench.model import SHAPES, llama_config

DENSE = "dense"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cotlab_jax.bench quantize", description=__doc__
    )
    parser.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    parser.add_argument(
        "--schemes", default=",".join(quantize.SCHEMES), help="comma-separated, besides dense"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed rounds after the warm-up"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(model.DTYPES))
    parser.add_argument("--attention_impl", default="auto", choices=model.ATTENTION_IMPLS)
    parser.add_argument("--out", default="bench_results/quantize.json")
    args = parser.parse_args(argv[1:])
    schemes = args.schemes.split(",")
    unknown = [scheme for scheme in schemes if scheme not in quantize.SCHEMES]
    if unknown:
        parser.error(f"unknown schemes {unknown}; known: {list(quantize.SCHEMES)}")
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: expected at least 1")

    shape = SHAPES[args.shape]
    config = llama_config(shape, dtype=args.dtype, attention_impl=args.attention_impl)
    graphdef, params = model.init(config, jax.random.key(0))
    models = {DENSE: (graphdef, params)}
    for scheme in schemes:
        models[scheme] = quantize.quantize(config, graphdef, params, scheme)

    rng = np.random.default_rng(0)
    prompts = jax.numpy.asarray(
        rng.integers(0, shape.vocab, (shape.decode_batch, shape.prompt_len)), jax.numpy.int32
    )
    prompt_mask = jax.numpy.ones(prompts.shape, bool)

    def run(name):
        return decode.greedy_decode(*models[name], prompts, prompt_mask, shape.new_tokens)

    for name in models:
        jax.block_until_ready(run(name))  # compile and warm up
    seconds = {name: [] for name in models}
    for _ in range(args.repeats):
        for name in models:
            start = time.perf_counter()
            jax.block_until_ready(run(name))
            seconds[name].append(time.perf_counter() - start)

    dense_seconds = statistics.median(seconds[DENSE])
    dense_bytes = quantize.weight_bytes(params)
    results = []
    for name, (_, state) in models.items():
        median = statistics.median(seconds[name])
        results.append(
            dict(
                scheme=name,
                bytes=quantize.weight_bytes(state),
                layer_bytes=quantize.weight_bytes(state["layers"]),
                bytes_vs_dense=quantize.weight_bytes(state) / dense_bytes,
                decode_ms=1e3 * median,
                decode_tasks_per_s=shape.decode_batch / median,
                speed_vs_dense=dense_seconds / median,
            )
        )

    device = jax.devices()[0]
    print(
        f"{device.device_kind}, shape {args.shape} (depth {shape.depth}, hidden {shape.hidden}),"
        f" {args.dtype} compute, decoding {shape.decode_batch} prompts of {shape.prompt_len}"
        f" tokens + {shape.new_tokens} new, median of {args.repeats}"
    )
    print(
        f"{'scheme':7} {'bytes':>13} {'vs dense':>9} {'layer bytes':>13} {'decode ms':>10} "
        f"{'tasks/s':>9} {'vs dense':>9}"
    )
    for r in results:
        print(
            f"{r['scheme']:7} {r['bytes']:13,d} {r['bytes_vs_dense']:9.3f} "
            f"{r['layer_bytes']:13,d} {r['decode_ms']:10.1f} {r['decode_tasks_per_s']:9.1f} "
            f"{r['speed_vs_dense']:8.2f}x"
        )

    report = dict(
        benchmark="quantize",
        device_kind=device.device_kind,
        platform=device.platform,
        jax_version=jax.__version__,
        flags=vars(args),
        shape=args.shape,
        params=model.count_params(params),
        results=results,
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
