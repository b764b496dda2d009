"""`python -m cotlab_jax.bench model [--flags]`: training-step and decoding throughput.

For each selected shape: a jitted training step (forward, backward and an AdamW update via
optax, state donated) in tokens per second and model FLOPs utilisation (MFU), and greedy
KV-cache decoding in tasks (prompts) per second. Times are medians over `--repeats` runs after
one compiling warm-up run. The state is sharded over all devices (a `data` mesh axis), so one
host with several accelerators is measured as a whole.

MFU = flops_per_token(training) * tokens/s / peak, with the peak from `--peak_tflops` or a table
of bfloat16 dense peaks per device; on a device not in the table (a CPU) MFU is null.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cotlab_jax import decode, model, sharding


@dataclasses.dataclass(frozen=True)
class Shape:
    depth: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    batch: int
    seq_len: int
    decode_batch: int
    prompt_len: int
    new_tokens: int


def _reference(depth: int) -> Shape:
    # DESIGN 1.5: 32 heads / 8 KV heads of 64, V=1024, batch 64 of 320 tokens; decoding 64
    # prompts of 316 tokens, 4 new tokens each.
    return Shape(depth, 2048, 8192, 32, 8, 64, 1024, 64, 320, 64, 316, 4)


SHAPES = {
    "cpu": Shape(2, 128, 512, 4, 2, 32, 1024, 16, 320, 16, 316, 4),
    "depth4": _reference(4),
    "depth12": _reference(12),
}

# Dense bfloat16 peak TFLOP/s per device, matched against `device_kind` (case-insensitive).
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "v5 lite": 197.0, "v5e": 197.0, "v4": 275.0}


def peak_tflops(device: jax.Device, override: float | None) -> float | None:
    if override is not None:
        return override
    kind = device.device_kind.lower()
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in kind), None)


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_shape(name: str, shape: Shape, args, mesh) -> dict:
    config = model.LlamaConfig(
        vocab_size=shape.vocab,
        num_hidden_layers=shape.depth,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        dtype=args.dtype,
        remat_policy=args.remat_policy,
        attention_impl=args.attention_impl,
    )
    graphdef, state = model.init_sharded(config, jax.random.key(0), mesh)
    state_shardings = sharding.state_shardings(state, mesh)
    tx = optax.adamw(5e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    opt_state = jax.jit(tx.init)(state)
    opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
    rng = np.random.default_rng(0)
    ids = jax.device_put(rng.integers(0, shape.vocab, (shape.batch, shape.seq_len)), batch_sharding)
    mask = jax.device_put(np.ones((shape.batch, shape.seq_len), bool), batch_sharding)

    def train_step(state, opt_state, ids, mask):
        def loss_fn(state):
            logits = model.apply(graphdef, state, ids, model.positions_from_mask(mask), mask)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
            weights = mask[:, 1:]
            return jnp.sum(losses * weights) / jnp.sum(weights)

        loss, grads = jax.value_and_grad(loss_fn)(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    train_step = jax.jit(
        train_step,
        donate_argnums=(0, 1),
        out_shardings=(state_shardings, opt_shardings, None),
    )
    carry = [state, opt_state]

    def one_step():
        carry[0], carry[1], loss = train_step(carry[0], carry[1], ids, mask)
        return loss

    with jax.set_mesh(mesh):
        step_seconds = _median_seconds(one_step, args.repeats)
        prompts = jax.device_put(
            rng.integers(0, shape.vocab, (shape.decode_batch, shape.prompt_len)), batch_sharding
        )
        prompt_mask = jax.device_put(
            np.ones((shape.decode_batch, shape.prompt_len), bool), batch_sharding
        )
        decode_seconds = _median_seconds(
            lambda: decode.greedy_decode(
                graphdef, carry[0], prompts, prompt_mask, shape.new_tokens
            ),
            args.repeats,
        )

    tokens_per_second = shape.batch * shape.seq_len / step_seconds
    peak = peak_tflops(jax.devices()[0], args.peak_tflops)
    flops = model.flops_per_token(config, shape.seq_len)
    mfu = None if peak is None else flops * tokens_per_second / (peak * 1e12 * mesh.size)
    return dict(
        shape=name,
        **dataclasses.asdict(shape),
        params=model.count_params(carry[0]),
        train_flops_per_token=flops,
        train_step_ms=1e3 * step_seconds,
        train_tokens_per_s=tokens_per_second,
        mfu=mfu,
        decode_ms=1e3 * decode_seconds,
        decode_tasks_per_s=shape.decode_batch / decode_seconds,
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m cotlab_jax.bench model", description=__doc__)
    parser.add_argument(
        "--shapes",
        default="cpu",
        help=f"comma-separated, from {sorted(SHAPES)}; 'reference' = depth4,depth12 (for a GPU)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(model.DTYPES))
    parser.add_argument("--remat_policy", default="none", choices=model.REMAT_POLICIES)
    parser.add_argument("--attention_impl", default="auto", choices=model.ATTENTION_IMPLS)
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU")
    parser.add_argument("--out", default="bench_results/model.json")
    args = parser.parse_args(argv[1:])
    names = args.shapes.replace("reference", "depth4,depth12").split(",")
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {sorted(SHAPES)} and 'reference'")

    mesh = sharding.make_mesh({"data": -1})
    device = jax.devices()[0]
    results = [bench_shape(name, SHAPES[name], args, mesh) for name in names]

    header = (
        f"{'shape':8} {'params':>12} {'step ms':>9} {'tokens/s':>11} {'MFU':>6} "
        f"{'decode ms':>10} {'tasks/s':>9}"
    )
    print(f"{device.device_kind} x {mesh.size}, {args.dtype}, remat {args.remat_policy}")
    print(header)
    for r in results:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(
            f"{r['shape']:8} {r['params']:12,d} {r['train_step_ms']:9.1f} "
            f"{r['train_tokens_per_s']:11,.0f} {mfu:>6} {r['decode_ms']:10.1f} "
            f"{r['decode_tasks_per_s']:9.1f}"
        )

    report = dict(
        benchmark="model",
        device_kind=device.device_kind,
        platform=device.platform,
        device_count=mesh.size,
        peak_tflops_per_device=peak_tflops(device, args.peak_tflops),
        jax_version=jax.__version__,
        flags=vars(args),
        results=results,
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
