"""`python -m cotlab_jax.bench model [--flags]`: training-step and decoding throughput.

For each selected shape: a jitted training step (forward, backward and an AdamW update via
optax, state donated) in tokens per second and model FLOPs utilisation (MFU), and greedy
KV-cache decoding in tasks (prompts) per second. Times are medians over `--repeats` runs after
two warm-up runs (compilations). The state is sharded over all devices (a `data` mesh axis), so one
host with several accelerators is measured as a whole.

MFU = flops_per_token(training) * tokens/s / peak, with the peak from `--peak_tflops` or a table
of bfloat16 dense peaks per device; on a device not in the table (a CPU) MFU is null.

`--vs_torch` (CPU, float32): the same model, weights, batch and optimizer in PyTorch
(`transformers.LlamaForCausalLM` with sdpa attention + `torch.optim.AdamW`, see
`cotlab_jax.torch_twin`), timed interleaved with ours run by run, so both see the same machine
load; the table gives medians and the ratio, and the first-step losses must agree. Shapes
default to `VS_TORCH_SHAPES`.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cotlab_jax import data, decode, model, sharding
from cotlab_jax.bench import positive_int


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
    # docs/tasks.md section 5: 32 heads / 8 KV heads of 64, V=1024, batch 64 of 320 tokens;
    # decoding 64 prompts of 316 tokens, 4 new tokens each.
    return Shape(depth, 2048, 8192, 32, 8, 64, 1024, 64, 320, 64, 316, 4)


SHAPES = {
    "cpu": Shape(2, 128, 512, 4, 2, 32, 1024, 16, 320, 16, 316, 4),
    # The quickstart's model and batch; a small paper-like model (depth 4) at the paper's V=64.
    "quickstart": Shape(2, 128, 512, 4, 2, 32, 64, 32, 70, 32, 66, 4),
    "paper_small": Shape(4, 256, 1024, 8, 2, 32, 64, 64, 240, 64, 236, 4),
    "depth4": _reference(4),
    "depth12": _reference(12),
}

VS_TORCH_SHAPES = "quickstart,paper_small"
ADAMW = dict(lr=5e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)

# Dense bfloat16 peak TFLOP/s per device, matched against `device_kind` (case-insensitive).
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "v5 lite": 197.0, "v5e": 197.0, "v4": 275.0}


def peak_tflops(device: jax.Device, override: float | None) -> float | None:
    if override is not None:
        return override
    kind = device.device_kind.lower()
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in kind), None)


def _median_seconds(fn, repeats: int) -> float:
    # Two warm-up calls: a train step's updated state can come back in another layout than the
    # initial one, which costs one more compilation on the second call.
    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def llama_config(shape: Shape, **options) -> model.LlamaConfig:
    """The Llama of a benchmark shape; `options` set the other `LlamaConfig` fields."""
    return model.LlamaConfig(
        vocab_size=shape.vocab,
        num_hidden_layers=shape.depth,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        **options,
    )


def _llama_config(shape: Shape, args) -> model.LlamaConfig:
    return llama_config(
        shape,
        dtype=args.dtype,
        remat_policy=args.remat_policy,
        attention_impl=args.attention_impl,
        formulation=args.formulation,
    )


def _jax_train_step(config: model.LlamaConfig, shape: Shape, mesh):
    """(graphdef, state, jitted step, ids, mask, rng) for one donated AdamW step."""
    graphdef, state = model.init_sharded(config, jax.random.key(0), mesh)
    state_shardings = sharding.state_shardings(state, mesh)
    tx = optax.adamw(
        ADAMW["lr"],
        b1=ADAMW["b1"],
        b2=ADAMW["b2"],
        eps=ADAMW["eps"],
        weight_decay=ADAMW["weight_decay"],
    )
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
    return graphdef, state, opt_state, train_step, ids, mask, rng


def bench_shape(name: str, shape: Shape, args, mesh) -> dict:
    config = _llama_config(shape, args)
    graphdef, state, opt_state, train_step, ids, mask, rng = _jax_train_step(config, shape, mesh)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
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


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def bench_vs_torch(name: str, shape: Shape, args, mesh, torch_twin) -> dict:
    """Our float32 train step and decoding against the torch twin's, timed alternately."""
    config = _llama_config(shape, args)
    graphdef, state, opt_state, train_step, ids, mask, rng = _jax_train_step(config, shape, mesh)
    # The same initial weights, optimizer numbers and a constant rate.
    train_cfg = ml_collections.ConfigDict(
        dict(**ADAMW, lr_schedule="constant", warmup_steps=0, grad_clip_norm=0.0)
    )
    twin = torch_twin.TorchTwin(state, config, train_cfg, total_steps=1, attn_implementation="sdpa")
    ids_np, mask_np = np.asarray(ids), np.asarray(mask)
    # The JAX step's loss: next-token cross-entropy over real target tokens.
    torch_batch = dict(
        input_ids=ids_np,
        attention_mask=mask_np,
        positions=np.maximum(np.cumsum(mask_np, -1) - 1, 0),
        labels=np.where(mask_np, ids_np, data.IGNORE_INDEX),
    )
    prompts = rng.integers(0, shape.vocab, (shape.decode_batch, shape.prompt_len))
    prompt_mask = np.ones(prompts.shape, bool)
    carry = [state, opt_state]

    def jax_step():
        carry[0], carry[1], loss = train_step(carry[0], carry[1], ids, mask)
        return loss

    def jax_decode():
        return decode.greedy_decode(graphdef, carry[0], prompts, prompt_mask, shape.new_tokens)

    def torch_decode():
        return twin.greedy_decode(prompts, prompt_mask, shape.new_tokens)

    with jax.set_mesh(mesh):
        # First steps from the same weights: the losses must agree to float32 rounding.
        jax_loss, torch_loss = float(jax_step()), twin.step(torch_batch)[0]
        if abs(jax_loss - torch_loss) > 1e-5 * abs(torch_loss):
            raise RuntimeError(f"{name}: first-step losses differ: {jax_loss} vs {torch_loss}")
        # Warm-up: the updated state's layout can cost one more compilation.
        jax.block_until_ready(jax_step())
        jax.block_until_ready(jax_decode())
        torch_decode()
        times = {key: [] for key in ("jax_step", "torch_step", "jax_decode", "torch_decode")}
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            times["jax_step"].append(_timed(jax_step))
            times["torch_step"].append(_timed(lambda: twin.step(torch_batch)))
            times["jax_decode"].append(_timed(jax_decode))
            times["torch_decode"].append(_timed(torch_decode))
    medians = {key: statistics.median(values) for key, values in times.items()}
    return dict(
        shape=name,
        **dataclasses.asdict(shape),
        params=model.count_params(carry[0]),
        first_loss_jax=jax_loss,
        first_loss_torch=torch_loss,
        torch_threads=torch_twin.torch.get_num_threads(),
        **{f"{key}_ms": 1e3 * value for key, value in medians.items()},
        **{f"{key}_ms_all": [1e3 * t for t in values] for key, values in times.items()},
        train_speedup=medians["torch_step"] / medians["jax_step"],
        decode_speedup=medians["torch_decode"] / medians["jax_decode"],
    )


def _print_vs_torch(results: list[dict]) -> None:
    print(
        f"{'shape':12} {'params':>10} {'jax step ms':>12} {'torch ms':>10} {'x torch':>8} "
        f"{'jax decode ms':>14} {'torch ms':>10} {'x torch':>8} {'first losses':>22}"
    )
    for r in results:
        print(
            f"{r['shape']:12} {r['params']:10,d} {r['jax_step_ms']:12.1f} "
            f"{r['torch_step_ms']:10.1f} {r['train_speedup']:8.2f} {r['jax_decode_ms']:14.1f} "
            f"{r['torch_decode_ms']:10.1f} {r['decode_speedup']:8.2f} "
            f"{r['first_loss_jax']:10.6f} {r['first_loss_torch']:10.6f}"
        )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m cotlab_jax.bench model", description=__doc__)
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated, from {sorted(SHAPES)}; 'reference' = depth4,depth12 (for a GPU); "
        f"default 'cpu', or {VS_TORCH_SHAPES!r} with --vs_torch",
    )
    parser.add_argument(
        "--vs_torch",
        action="store_true",
        help="side by side with PyTorch on the CPU, float32 (needs torch and transformers)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed runs after the warm-up"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(model.DTYPES))
    parser.add_argument("--remat_policy", default="none", choices=model.REMAT_POLICIES)
    parser.add_argument("--attention_impl", default="auto", choices=model.ATTENTION_IMPLS)
    parser.add_argument(
        "--formulation",
        default="auto",
        choices=model.FORMULATIONS,
        help="the model's program: 'auto' (per platform), 'cpu' or 'accelerator'",
    )
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU")
    parser.add_argument("--out", default="bench_results/model.json")
    args = parser.parse_args(argv[1:])
    if args.shapes is None:
        args.shapes = VS_TORCH_SHAPES if args.vs_torch else "cpu"
    if args.vs_torch:
        args.dtype = "float32"  # as the reference trains
        if args.out == parser.get_default("out"):
            args.out = "bench_results/model_vs_torch.json"
    names = args.shapes.replace("reference", "depth4,depth12").split(",")
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {sorted(SHAPES)} and 'reference'")

    mesh = sharding.make_mesh({"data": -1})
    device = jax.devices()[0]
    if args.vs_torch:
        # Imported only when asked for: the JAX benchmark runs where torch is not installed.
        from cotlab_jax import torch_twin

        results = [bench_vs_torch(name, SHAPES[name], args, mesh, torch_twin) for name in names]
        print(f"{device.device_kind} x {mesh.size}, float32, torch {torch_twin.torch.__version__}")
        _print_vs_torch(results)
        _write(args, device, mesh, results, benchmark="model_vs_torch")
        return
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

    _write(args, device, mesh, results, benchmark="model")


def _write(args, device, mesh, results: list[dict], benchmark: str) -> None:
    report = dict(
        benchmark=benchmark,
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
