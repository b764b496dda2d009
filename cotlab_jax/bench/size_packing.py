"""Size packing against one program per size: `python -m cotlab_jax.bench size_packing`.

The papers' depth sweep {4, 8, 12}, evaluated (`evaluate.eval_step`: teacher-forced loss and
greedy KV-cache decoding of the answer, the reference's default task with CoT prompts) as one
size-packed program (`size_packing`, `evaluate.size_packed_eval_step`) against three separate
programs, side by side in one run. Cases (`--cases`):

- `cpu`: on this machine at a CPU width (hidden 256, MLP 1024, 8/2 heads of 32): compile time
  (lowering + XLA compile, medians of `--repeats` fresh compiles, interleaved) and the time of
  one evaluation batch of every member (`--batch_size` tasks each), packed against one after
  another.
- `reference_compile`: the same compiles at the reference's width (hidden 2048, MLP 8192,
  32/8 heads of 64, V=1024) on this machine, from abstract inputs (nothing is allocated).
- `tpu_aot`: the reference-width compiles for a TPU topology (`--topology`, libtpu needed;
  skipped without it), with the compiled memory per chip and the analytic forward FLOPs.
- `train_cpu`: an AdamW train step at the CPU width, size-packed (members' gradients and Adam
  moments in the padded shape) against one step per member: what size-packed training would
  cost (see the README's decision).

A packed program pays the deepest member's compute for every member (3 x 12 = 36 layers
against 4 + 8 + 12 = 24); what it saves is compiles and launches.
"""

import argparse
import functools
import json
import os
import time

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from cotlab_jax import aot, config, data, evaluate, losses, model, sharding, size_packing
from cotlab_jax.bench import positive_int

WIDTHS = {
    "cpu": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
    ),
    "reference": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    ),
}
CASES = ("cpu", "reference_compile", "tpu_aot", "train_cpu")


def task_spec() -> data.TaskSpec:
    """The reference's default task (V=1024, N=M=4, C=2, K=40) with CoT prompts."""
    cfg = config.get_base_config()
    cfg.data.prompt_strategy = "cot"
    return data.TaskSpec.from_config(cfg)


def member_configs(depths, width: str, dtype: str, formulation: str = "auto"):
    return [
        model.LlamaConfig(
            vocab_size=1024,
            num_hidden_layers=depth,
            dtype=dtype,
            formulation=formulation,
            **WIDTHS[width],
        )
        for depth in depths
    ]


def eval_batch(spec: data.TaskSpec, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    keys = data.root_keys(seed)
    world = data.make_world(keys["world"], spec)
    tasks = data.build_eval_set(world, keys["eval"], spec, batch_size)
    return {name: tasks[name] for name in evaluate.EVAL_FIELDS}


def _abstract(tree, sharding_=None):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding_), tree
    )


def _programs(configs, spec, batch, mesh):
    """{name: (jitted function, abstract arguments)}: each member alone and the pack, its
    inputs abstract (`jax.ShapeDtypeStruct`s placed over `mesh`)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    packed_config = size_packing.packed_config(configs)
    programs = {}

    def abstract_params(config, leading=()):
        init = functools.partial(model.init, config)
        graphdef, params = jax.eval_shape(init, jax.random.key(0))
        if leading:
            params = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct((*leading, *x.shape), x.dtype), params
            )
        with jax.set_mesh(mesh):
            shardings = sharding.state_shardings(params, mesh, ("replica",) * len(leading))
        return graphdef, jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
        )

    for config_ in configs:
        graphdef, params = abstract_params(config_)
        programs[f"depth {config_.num_hidden_layers}"] = (
            evaluate.eval_step,
            (graphdef, params, _abstract(batch, batch_sharding), spec, None),
        )
    graphdef, params = abstract_params(packed_config, (len(configs),))
    sizes = jax.tree.map(
        lambda *xs: np.stack(xs), *[size_packing.member_sizes(c, packed_config) for c in configs]
    )
    stacked = {name: np.stack([value] * len(configs), axis=1) for name, value in batch.items()}
    programs["packed"] = (
        evaluate.size_packed_eval_step,
        (
            graphdef,
            params,
            _abstract(sizes, replicated),
            _abstract(stacked, batch_sharding),
            spec,
            None,
            None,
        ),
    )
    return programs


def compile_times(configs, spec, batch, mesh, repeats: int) -> dict:
    """Seconds to lower and compile each program, fresh each time (medians), interleaved."""
    programs = _programs(configs, spec, batch, mesh)
    samples = {name: [] for name in programs}
    compiled = {}
    for _ in range(repeats):
        for name, (fn, args) in programs.items():
            jax.clear_caches()  # a fresh trace, lowering and compile every time
            start = time.perf_counter()
            with jax.set_mesh(mesh):
                compiled[name] = fn.lower(*args).compile()
            samples[name].append(time.perf_counter() - start)
    median = {name: float(np.median(s)) for name, s in samples.items()}
    separate = sum(v for k, v in median.items() if k != "packed")
    return dict(
        compile_s=median,
        compile_samples=samples,
        separate_compile_s=separate,
        packed_compile_s=median["packed"],
        compile_speedup=separate / median["packed"],
        compiled=compiled,
    )


def forward_flops(configs, spec, batch_size) -> dict:
    """Analytic forward FLOPs of one evaluation batch (the teacher-forced pass; decoding adds
    target_len one-token steps): separate members against the pack (every member at the
    packed shape)."""
    tokens = batch_size * spec.seq_len
    packed_config = size_packing.packed_config(configs)
    separate = sum(model.flops_per_token(c, spec.seq_len, training=False) for c in configs)
    packed = len(configs) * model.flops_per_token(packed_config, spec.seq_len, training=False)
    return dict(separate_flops=separate * tokens, packed_flops=packed * tokens)


def run_times(configs, spec, batch, repeats: int) -> dict:
    """Seconds per evaluation batch of every member, packed and one after another."""
    members = [
        (c, jax.jit(functools.partial(model.init, c))(jax.random.key(i))[1])
        for i, c in enumerate(configs)
    ]
    pack = size_packing.pack(members)
    stacked = {name: np.stack([value] * len(configs), axis=1) for name, value in batch.items()}
    singles = [
        (jax.eval_shape(functools.partial(model.init, c), jax.random.key(0))[0], params)
        for c, params in members
    ]

    def packed_run():
        return jax.block_until_ready(
            evaluate.size_packed_eval_step(
                pack.graphdef, pack.params, pack.sizes, stacked, spec, None, None
            )
        )

    def separate_run():
        return jax.block_until_ready(
            [evaluate.eval_step(g, p, batch, spec, None) for g, p in singles]
        )

    packed_run(), separate_run()  # compile and warm up
    samples = {"packed": [], "separate": []}
    for _ in range(repeats):
        for name, fn in (("packed", packed_run), ("separate", separate_run)):
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    median = {name: float(np.median(s)) for name, s in samples.items()}
    return dict(
        step_s=median,
        step_samples=samples,
        step_speedup=median["separate"] / median["packed"],
    )


def _train_step(graphdef, tx, params, opt_state, batch, sizes=None):
    def loss(p):
        ids, positions, mask = (batch[k] for k in ("input_ids", "positions", "attention_mask"))
        logits = model.apply(graphdef, p, ids, positions, mask, sizes=sizes)
        return losses.teacher_forced_loss(logits, batch["labels"])[0]

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def train_times(configs, spec, batch_size: int, repeats: int) -> dict:
    """Compile and step seconds of AdamW steps: one size-packed program against one program
    per member (the timing of size-packed training, not an exact training of it: padded
    heads would also need their output masked from the gradients)."""
    keys = data.root_keys(0)
    world = data.make_world(keys["world"], spec)
    batch = data.sample_batch(world, keys["train"], 0, spec, batch_size)
    batch = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "positions")}
    tx = optax.adamw(1e-4)
    members = [
        (c, jax.jit(functools.partial(model.init, c))(jax.random.key(i))[1])
        for i, c in enumerate(configs)
    ]
    pack = size_packing.pack(members)
    stacked = {k: np.stack([v] * len(configs)) for k, v in batch.items()}

    def packed_step(params, opt_state, batch):
        return jax.vmap(functools.partial(_train_step, pack.graphdef, tx))(
            params, opt_state, batch, pack.sizes
        )

    packed_fn = jax.jit(packed_step, donate_argnums=(0, 1))
    packed_state = [pack.params, jax.jit(jax.vmap(tx.init))(pack.params)]
    singles = []
    for config_, params in members:
        graphdef = jax.eval_shape(functools.partial(model.init, config_), jax.random.key(0))[0]
        fn = jax.jit(functools.partial(_train_step, graphdef, tx), donate_argnums=(0, 1))
        singles.append([fn, params, jax.jit(tx.init)(params)])

    start = time.perf_counter()
    packed_compiled = packed_fn.lower(*packed_state, stacked).compile()
    packed_compile = time.perf_counter() - start
    start = time.perf_counter()
    single_compiled = [fn.lower(p, o, batch).compile() for fn, p, o in singles]
    separate_compile = time.perf_counter() - start

    def packed_run():
        packed_state[:2] = packed_compiled(*packed_state, stacked)[:2]
        jax.block_until_ready(packed_state)

    def separate_run():
        for compiled, single in zip(single_compiled, singles, strict=True):
            single[1:3] = compiled(single[1], single[2], batch)[:2]
        jax.block_until_ready([s[1] for s in singles])

    packed_run(), separate_run()
    samples = {"packed": [], "separate": []}
    for _ in range(repeats):
        for name, fn in (("packed", packed_run), ("separate", separate_run)):
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    median = {name: float(np.median(s)) for name, s in samples.items()}
    return dict(
        batch_size=batch_size,
        seq_len=spec.seq_len,
        separate_compile_s=separate_compile,
        packed_compile_s=packed_compile,
        compile_speedup=separate_compile / packed_compile,
        step_s=median,
        step_samples=samples,
        step_speedup=median["separate"] / median["packed"],
    )


def _memory(compiled) -> int | None:
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m cotlab_jax.bench size_packing")
    parser.add_argument("--depths", default="4,8,12")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument(
        "--batch_size", type=positive_int, default=4, help="eval tasks per member (CPU)"
    )
    parser.add_argument("--train_batch_size", type=positive_int, default=4)
    parser.add_argument(
        "--aot_batch_size", type=positive_int, default=64, help="eval tasks, TPU AOT"
    )
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--out", default="bench_results/size_packing.json")
    args = parser.parse_args(argv[1:])
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; expected some of {CASES}")
    depths = [int(d) for d in args.depths.split(",")]
    spec = task_spec()
    host_mesh = sharding.make_mesh({}, devices=jax.local_devices()[:1])
    results = {}
    rows = []

    if "cpu" in cases:
        configs = member_configs(depths, "cpu", "float32")
        batch = eval_batch(spec, args.batch_size)
        result = compile_times(configs, spec, batch, host_mesh, args.repeats)
        result.pop("compiled")
        result.update(run_times(configs, spec, batch, args.repeats))
        results["cpu"] = result
        rows.append(("cpu width, this CPU", result))
    if "reference_compile" in cases:
        configs = member_configs(depths, "reference", "bfloat16")
        batch = eval_batch(spec, args.batch_size)
        result = compile_times(configs, spec, batch, host_mesh, args.repeats)
        result.pop("compiled")
        result.update(forward_flops(configs, spec, args.batch_size))
        results["reference_compile"] = result
        rows.append(("reference width, this CPU", result))
    if "tpu_aot" in cases:
        try:
            devices = aot.get_topology(args.topology).devices
        except ValueError as error:
            results["tpu_aot"] = dict(skipped=str(error))
            print(f"tpu_aot skipped: {error}")
        else:
            mesh = sharding.make_mesh(dict(fsdp=len(devices)), devices=devices)
            configs = member_configs(depths, "reference", "bfloat16")
            batch = eval_batch(spec, args.aot_batch_size)
            result = compile_times(configs, spec, batch, mesh, args.repeats)
            compiled = result.pop("compiled")
            result.update(
                forward_flops(configs, spec, args.aot_batch_size),
                topology=args.topology,
                device_kind=devices[0].device_kind,
                n_devices=len(devices),
                memory_per_device_bytes={name: _memory(c) for name, c in compiled.items()},
            )
            results["tpu_aot"] = result
            rows.append((f"reference width, TPU {args.topology} (AOT)", result))
    if "train_cpu" in cases:
        configs = member_configs(depths, "cpu", "float32")
        results["train_cpu"] = train_times(configs, spec, args.train_batch_size, args.repeats)
        rows.append(("train step, cpu width, this CPU", results["train_cpu"]))

    print(
        f"depths {depths}, task {spec.prompt_strategy} (seq_len {spec.seq_len}); "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}); medians of {args.repeats}"
    )
    print(
        f"{'case':42s} {'compile: separate':>18s} {'packed':>8s} {'ratio':>6s} "
        f"{'step: separate':>15s} {'packed':>9s} {'ratio':>6s}"
    )
    for label, r in rows:
        step = r.get("step_s")
        step_text = (
            f"{step['separate'] * 1e3:13.1f}ms {step['packed'] * 1e3:7.1f}ms "
            f"{r['step_speedup']:5.2f}x"
            if step
            else f"{'(flops ' + format(r['separate_flops'] / r['packed_flops'], '.2f') + 'x)':>33s}"
        )
        print(
            f"{label:42s} {r['separate_compile_s']:17.1f}s {r['packed_compile_s']:7.1f}s "
            f"{r['compile_speedup']:5.2f}x {step_text}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(
                benchmark="size_packing",
                depths=depths,
                widths={name: WIDTHS[name] for name in ("cpu", "reference")},
                prompt_strategy=spec.prompt_strategy,
                seq_len=spec.seq_len,
                batch_size=args.batch_size,
                backend=jax.default_backend(),
                device_kind=jax.devices()[0].device_kind,
                jax_version=jax.__version__,
                repeats=args.repeats,
                results=results,
            ),
            f,
            indent=2,
            default=float,
        )
    print(f"wrote {args.out}")
