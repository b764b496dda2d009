"""Ahead-of-time compilation of the sharded train step for a real TPU topology.

With `libtpu` installed (`pip install "jax[tpu]"`, or the `libtpu` version jax pins), XLA's TPU
compiler runs on any host, TPU or not: `jax.experimental.topologies` describes a slice's devices
without touching hardware, and the train step is lowered from `jax.ShapeDtypeStruct`s (no
parameter is ever allocated) and compiled for it. The compiled executable's memory analysis
gives the per-device footprint, to check against the chip's HBM before paying for the slice.

`python -m cotlab_jax.aot --topology=v5e:16x16 --config=configs/default.py \
    --config.model.num_hidden_layers=12 [--mesh=fsdp=64,tensor=4] \
    --out=bench_results/aot_v5e_16x16.json`

Without `--mesh` the batch axes take as many devices as the batch allows (`fsdp` = gcd of the
device count and the batch size) and `tensor` takes the rest, so the paper's batch of 64 stays
whole: v5e 16x16 (256 chips) gets fsdp=64 x tensor=4, v4 4x4x4 (64 chips) gets fsdp=64.
"""

import functools
import json
import math
import os
import sys
import time

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from cotlab_jax import cli_errors, data, experiment, model, sharding
from cotlab_jax import config as config_lib

GiB = 1024**3

# HBM per JAX device (a chip; a v4 chip is one megacore device) by `device_kind`.
HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,
    "TPU v5e": 16 * GiB,
    "TPU v5": 95 * GiB,  # v5p
    "TPU v5p": 95 * GiB,
    "TPU v6 lite": 32 * GiB,  # Trillium
    "TPU v6e": 32 * GiB,
}

# Topology options by chip generation: v4 (two TensorCores per chip) is compiled as megacore,
# one device per chip, as JAX runs it by default on a v4 slice.
TOPOLOGY_OPTIONS = {"v4": dict(chip_config_name="megacore")}


def get_topology(topology_name: str):
    """The compile-only devices of a TPU topology such as "v5e:16x16" or "v4:4x4x4"."""
    from jax.experimental import topologies

    options = TOPOLOGY_OPTIONS.get(topology_name.split(":")[0], {})
    try:
        return topologies.get_topology_desc(topology_name=topology_name, platform="tpu", **options)
    except Exception as error:  # jax and libtpu reject a topology with several error types
        lines = str(error).strip().splitlines()
        raise ValueError(
            f"--topology={topology_name}: cannot describe this TPU topology "
            f"({type(error).__name__}: {lines[0] if lines else ''})"
        ) from None


def default_mesh_axes(n_devices: int, batch_size: int) -> dict[str, int]:
    """fsdp over as many devices as divide the batch, tensor parallelism over the rest."""
    fsdp = math.gcd(n_devices, batch_size)
    return dict(replica=1, data=1, fsdp=fsdp, tensor=n_devices // fsdp)


def parse_mesh(text: str) -> dict[str, int]:
    """ "data=1,fsdp=64,tensor=4" -> {"data": 1, "fsdp": 64, "tensor": 4}."""
    axes = {}
    for item in filter(None, text.split(",")):
        name, _, size = item.partition("=")
        if name.strip() not in sharding.MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise ValueError(
                f"--mesh item {item!r}: expected <axis>=<size> with axis one of "
                f"{sharding.MESH_AXES}"
            )
        axes[name.strip()] = int(size)
    return axes


def abstract_train_inputs(exp: experiment.Experiment):
    """(graphdef, state, world, train_key) as sharded `jax.ShapeDtypeStruct`s over `exp.mesh`:
    what `experiment.init_state` and the training loop would place, without allocating."""
    replicated = NamedSharding(exp.mesh, PartitionSpec())
    graphdef, state = experiment.abstract_state(exp)

    def with_sharding(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    keys = data.root_keys(exp.config.seed)
    world = jax.eval_shape(functools.partial(data.make_world, spec=exp.spec), keys["world"])
    world = jax.tree.map(lambda x: with_sharding(x, replicated), world)
    train_key = with_sharding(jax.eval_shape(lambda: keys["train"]), replicated)
    return graphdef, state, world, train_key


def compile_for_topology(
    config: ml_collections.ConfigDict, topology_name: str, mesh_axes: dict | None = None
) -> dict:
    """Compiles the train step of `config` for a TPU topology; returns its compiled memory
    (bytes per device), FLOPs and whether it fits the chip's HBM.

    `mesh_axes` (sizes of replica/data/fsdp/tensor, one may be -1) replaces `config.mesh`;
    None picks `default_mesh_axes`.
    """
    devices = get_topology(topology_name).devices
    batch_size = config.train.batch_size
    mesh_axes = dict(mesh_axes) if mesh_axes else default_mesh_axes(len(devices), batch_size)
    exp = experiment.setup(config, sharding.make_mesh(mesh_axes, devices=devices))
    mesh = exp.mesh

    graphdef, state, world, train_key = abstract_train_inputs(exp)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jax.jit(
        functools.partial(experiment.sampled_train_step, graphdef=graphdef, exp=exp),
        in_shardings=(
            state_shardings,
            jax.tree.map(lambda x: x.sharding, world),
            train_key.sharding,
        ),
        out_shardings=state_shardings,
        donate_argnums=0,
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step_fn.lower(state, world, train_key)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

    memory = compiled.memory_analysis()
    mem = {
        name: int(getattr(memory, f"{name}_size_in_bytes"))
        for name in ("argument", "output", "alias", "temp", "generated_code")
    }
    total = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    peak = getattr(memory, "peak_memory_in_bytes", None)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_device = float(cost.get("flops", float("nan")))
    device_kind = devices[0].device_kind
    hbm = HBM_BYTES.get(device_kind)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))
    seq_len = exp.spec.seq_len
    model_flops = model.flops_per_token(exp.model_config, seq_len) * batch_size * seq_len
    return dict(
        topology=topology_name,
        device_kind=device_kind,
        n_devices=len(devices),
        mesh=dict(mesh.shape),
        n_params=int(n_params),
        num_hidden_layers=exp.model_config.num_hidden_layers,
        hidden_size=exp.model_config.hidden_size,
        batch_size=batch_size,
        seq_len=seq_len,
        remat_policy=exp.model_config.remat_policy,
        memory_per_device_bytes=dict(
            **mem, total=total, **({"peak": int(peak)} if peak is not None else {})
        ),
        memory_per_device_gib=round(total / GiB, 3),
        hbm_per_device_bytes=hbm,
        hbm_per_device_gib=None if hbm is None else hbm / GiB,
        hbm_fraction=None if hbm is None else round(total / hbm, 4),
        fits_hbm=None if hbm is None else total <= hbm,
        compiled_flops_per_device=flops_per_device,
        compiled_flops_per_step=flops_per_device * len(devices),
        model_flops_per_step=model_flops,
        flops_note=(
            "compiled_flops_* are XLA's cost analysis of the compiled program, which "
            "counts the body of the layer scan's while loop once, not once per layer; "
            "model_flops_per_step is the analytic count (model.flops_per_token)"
        ),
        bytes_accessed_per_device=float(cost.get("bytes accessed", float("nan"))),
        lower_s=round(lower_s, 2),
        compile_s=round(compile_s, 2),
        jax_version=jax.__version__,
        libtpu_version=_libtpu_version(),
    )


def _libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")


@cli_errors.one_line  # a missing --config or an unwritable --out ends in one line
def main(argv) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/<file>.py is required")
    try:
        mesh_axes = parse_mesh(_MESH.value) if _MESH.value else None
        result = compile_for_topology(_CONFIG.value, _TOPOLOGY.value, mesh_axes)
    except (config_lib.ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    if _OUT.value:
        write_json(result, _OUT.value)
    mem = result["memory_per_device_bytes"]
    print(
        f"{result['topology']} ({result['n_devices']} x {result['device_kind']}), mesh "
        f"{result['mesh']}, {result['n_params'] / 1e6:.0f}M params: per device "
        f"{result['memory_per_device_gib']:.2f} GiB (arguments {mem['argument'] / GiB:.2f}, "
        f"temp {mem['temp'] / GiB:.2f}, output {mem['output'] / GiB:.2f}, aliased "
        f"{mem['alias'] / GiB:.2f}) of {result['hbm_per_device_gib']} GiB HBM, fits: "
        f"{result['fits_hbm']}; {result['compiled_flops_per_step']:.3g} FLOPs/step compiled "
        f"({result['model_flops_per_step']:.3g} model); compiled in {result['compile_s']:.0f} s"
    )


if __name__ == "__main__":
    from absl import app, flags

    from cotlab_jax import config_flag

    _CONFIG = config_flag.define_config_flag()
    _TOPOLOGY = flags.DEFINE_string(
        "topology", "v5e:16x16", 'TPU topology, e.g. "v5e:16x16", "v4:4x4x4".'
    )
    _MESH = flags.DEFINE_string(
        "mesh",
        None,
        'Mesh axis sizes, e.g. "fsdp=64,tensor=4"; '
        "default: fsdp over gcd(devices, batch), tensor over the rest.",
    )
    _OUT = flags.DEFINE_string("out", None, "Write the result as JSON to this path.")
    app.run(main, flags_parser=config_flag.parse_flags)
