"""Logical axis names -> mesh axes, for model parameters and activations.

Every parameter carries logical axis names in its flax `out_sharding` metadata (see
`cotlab_jax.model`), and the main activations pass through `constrain`. One table of rules,
in MaxText's style, maps those names onto the mesh axes `replica`, `data`, `fsdp` and `tensor`:
the rules are tried in order, and a rule applies to a dimension when its logical name matches,
its mesh axes are not yet used by another dimension of the same array, and the dimension divides
evenly over them; a dimension no rule applies to is replicated. So with the default rules a
parameter's `embed` dimension is sharded over `fsdp`, while an activation's `embed` dimension
stays whole because its `batch` dimension has already taken `fsdp`.

Rules other than `DEFAULT_RULES` are set for a block of code with flax's context manager,
`with nnx.logical_axis_rules(rules): ...`, which both `state_shardings` and `constrain` read.
"""

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("replica", "data", "fsdp", "tensor")

# (logical axis name, mesh axis or tuple of mesh axes), highest priority first.
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: LogicalRules = (
    ("replica", "replica"),
    ("batch", ("data", "fsdp")),
    # Fallbacks for a batch that does not divide over data x fsdp.
    ("batch", "data"),
    ("batch", "fsdp"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


def current_rules() -> LogicalRules:
    """The rules set by `nnx.logical_axis_rules(...)` around the caller, else `DEFAULT_RULES`."""
    return flax_spmd.get_logical_axis_rules() or DEFAULT_RULES


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over the axes `MESH_AXES` with the given sizes; one size may be -1 (the rest).

    The axes are `Auto` (the compiler propagates shardings from the constraints), since the
    model's contractions are not written with the explicit output shardings that `Explicit`
    axes (`jax.make_mesh`'s default) would require.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ValueError(
            f"mesh axis sizes {dict(zip(MESH_AXES, sizes, strict=True))}: expected positive sizes "
            "and at most one -1"
        )
    known = int(np.prod([size for size in sizes if size != -1]))
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh axis sizes {dict(zip(MESH_AXES, sizes, strict=True))} do not multiply to the "
            f"{len(devices)} devices"
        )
    return jax.make_mesh(
        sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_mesh_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh_axis_sizes: Mapping[str, int],
    rules: LogicalRules,
) -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose dimensions have logical `names`."""
    if len(names) != len(shape):
        raise ValueError(f"logical axis names {tuple(names)} do not match shape {tuple(shape)}")
    assigned: list[str | tuple[str, ...] | None] = [None] * len(names)
    used: set[str] = set()
    for name, mesh_axes in rules:
        if mesh_axes is None or name not in names:
            continue
        dim = names.index(name)
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        if assigned[dim] is not None or used.intersection(axes):
            continue
        if any(axis not in mesh_axis_sizes for axis in axes):
            continue
        if shape[dim] % int(np.prod([mesh_axis_sizes[axis] for axis in axes])):
            continue
        assigned[dim] = mesh_axes
        used.update(axes)
    return PartitionSpec(*assigned)


def state_shardings(abstract_state, mesh: Mesh, leading_names: Sequence[str] = ()):
    """NamedShardings for every variable of an nnx state, from its `out_sharding` axis names.

    `abstract_state` may hold arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`); the
    result has the state's structure, so it serves as `out_shardings`/`in_shardings` of a jit.
    `leading_names` name axes added in front of every variable by a `jax.vmap` that does not
    update the metadata, e.g. ("replica",) for sweep members stacked into one state.
    """
    rules = current_rules()

    def sharding(variable: nnx.Variable):
        own = variable.get_metadata().get("out_sharding")
        own = (None,) * (len(variable.shape) - len(leading_names)) if own is None else own
        spec = logical_to_mesh_spec((*leading_names, *own), variable.shape, mesh.shape, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical axis names; a no-op without a mesh.

    The mesh is the one set by `jax.set_mesh(mesh)` around tracing, so the same model code runs
    unsharded in tests and sharded in training.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_mesh_spec(names, x.shape, dict(mesh.shape), current_rules())
    return jax.lax.with_sharding_constraint(x, spec)
