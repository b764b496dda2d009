"""Models of different sizes run as one vmapped program over the largest shape, exactly.

Members that differ in depth, attention heads, KV heads, head dimension, MLP width or hidden
width (and agree on everything else: `shared_fields`) are zero-padded into one `packed_config`
and stacked on a leading member axis; `model.MemberSizes` tells the forward pass each member's own
sizes. The padding is an exact no-op:

- a padded layer is skipped (`layer_active`): the residual stream passes it unchanged;
- padded query heads have zero projections in and out, padded MLP neurons zero gate, up and down
  projections, so they add exact zeros;
- padded hidden dimensions have zero embeddings and zero output columns in every projection, so
  they stay zero, and RMSNorm divides by the member's own width (`hidden_size`);
- a member's head dimension d sits inside the packed D as HF's rotate-half pairs it: its halves at
  [0, d/2) and [D/2, D/2 + d/2), so pair (i, i + d/2) is the packed pair (i, i + D/2), rotated by
  the member's own frequencies (`inv_freq`) and scored with 1 / sqrt(d) (`attention_scale`);
- KV heads: the packed model has G = gcd of the members' query groups (heads / KV heads) query
  heads per KV head. A member with g query heads per KV head keeps its query heads in order and
  has each KV head copied into the g / G packed KV slots its query heads read (identical copies
  compute identical keys and values); slots past its heads are zero.

So a packed member's logits are its own up to float32 rounding (sums over longer, zero-padded
axes may be reduced in another order; on a CPU the pack also runs the accelerator formulation,
see `packed_config`). `unpad_params` takes a member's own parameters back out,
bit for bit. The padding costs every member the largest member's compute; what it saves is
compiles and launches (`python -m cotlab_jax.bench size_packing`).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotlab_jax import model

# The sizes members may differ in; every other `LlamaConfig` field must agree.
SIZE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def shared_fields(config: model.LlamaConfig) -> tuple:
    """What size-packed members must share: every config field but `SIZE_FIELDS`, as (name,
    value) pairs (hashable, a grouping key)."""
    return tuple(
        (field.name, getattr(config, field.name))
        for field in dataclasses.fields(config)
        if field.name not in SIZE_FIELDS
    )


def _query_groups(config: model.LlamaConfig) -> int:
    return config.num_attention_heads // config.num_key_value_heads


def packed_config(configs) -> model.LlamaConfig:
    """The one shape every config of `configs` fits in exactly (see the module docstring).
    Raises ValueError (one line) naming a field they do not share.

    With formulation "auto" the pack takes the accelerator formulation on every platform: its
    layers run in one scan, so compile time stays flat in depth (the CPU formulation unrolls
    the layers, and a depth-12 pack would compile like 36 layers of members alone)."""
    configs = list(configs)
    if not configs:
        raise ValueError("size packing needs at least one model config")
    first = dict(shared_fields(configs[0]))
    for config in configs[1:]:
        for name, value in shared_fields(config):
            if value != first[name]:
                raise ValueError(
                    f"model.{name}: size-packed members must share it, got {first[name]!r} and "
                    f"{value!r} (they may differ only in {', '.join(SIZE_FIELDS)})"
                )
    heads = max(c.num_attention_heads for c in configs)
    groups = functools.reduce(math.gcd, (_query_groups(c) for c in configs))
    return dataclasses.replace(
        configs[0],
        num_hidden_layers=max(c.num_hidden_layers for c in configs),
        hidden_size=max(c.hidden_size for c in configs),
        intermediate_size=max(c.intermediate_size for c in configs),
        num_attention_heads=heads,
        num_key_value_heads=heads // groups,
        head_dim=max(c.head_dim for c in configs),
        formulation="accelerator" if first["formulation"] == "auto" else first["formulation"],
    )


def _axis_size(config: model.LlamaConfig, name: str) -> int:
    return {
        "layers": config.num_hidden_layers,
        "embed": config.hidden_size,
        "mlp": config.intermediate_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab": config.vocab_size,
    }[name]


def member_positions(name: str, member: model.LlamaConfig, packed: model.LlamaConfig):
    """int [member's size of axis `name`]: where each of the member's entries sits in the packed
    axis (for KV heads, the first of its copies)."""
    size = _axis_size(member, name)
    if name == "kv_heads":
        return np.arange(size) * (_query_groups(member) // _query_groups(packed))
    if name == "head_dim":
        half = np.arange(size // 2)
        return np.concatenate([half, packed.head_dim // 2 + half])
    return np.arange(size)


def packed_sources(name: str, member: model.LlamaConfig, packed: model.LlamaConfig):
    """(source int [packed size], valid bool [packed size]) of axis `name`: packed entry i holds
    the member's entry source[i] where valid[i], else zero."""
    size = _axis_size(packed, name)
    if name == "kv_heads":
        # Packed KV slot s serves packed query heads [s G, (s + 1) G), the member's KV head
        # (s G) // g while those are its own heads.
        first_query = np.arange(size) * _query_groups(packed)
        source = first_query // _query_groups(member)
        valid = first_query < member.num_attention_heads
    else:
        source = np.zeros(size, np.int64)
        positions = member_positions(name, member, packed)
        source[positions] = np.arange(len(positions))
        valid = np.zeros(size, bool)
        valid[positions] = True
    return np.where(valid, source, 0), valid


def _axis_names(variable: nnx.Variable) -> tuple[str, ...]:
    names = variable.get_metadata().get("out_sharding")
    if names is None or len(names) != variable.ndim:
        raise ValueError(f"a parameter of shape {variable.shape} has no logical axis names")
    return tuple(names)


def _map_params(fn, params):
    """`fn(value, axis names)` for every parameter of an nnx state, keeping its metadata."""
    return jax.tree.map(
        lambda v: v.replace(fn(v[...], _axis_names(v))),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def pad_params(params, member: model.LlamaConfig, packed: model.LlamaConfig):
    """A member's parameters (an nnx state of `member`'s shapes) zero-padded to `packed`'s."""

    def pad(value, names):
        for axis, name in enumerate(names):
            source, valid = packed_sources(name, member, packed)
            value = jnp.take(value, jnp.asarray(source), axis=axis)
            shape = [1] * value.ndim
            shape[axis] = len(valid)
            value = jnp.where(jnp.asarray(valid).reshape(shape), value, jnp.zeros((), value.dtype))
        return value

    return _map_params(pad, params)


def unpad_params(params, member: model.LlamaConfig, packed: model.LlamaConfig):
    """The member's own parameters (its shapes, no padding) out of its padded ones."""

    def unpad(value, names):
        for axis, name in enumerate(names):
            value = jnp.take(value, jnp.asarray(member_positions(name, member, packed)), axis=axis)
        return value

    return _map_params(unpad, params)


def member_sizes(member: model.LlamaConfig, packed: model.LlamaConfig) -> model.MemberSizes:
    """The `model.MemberSizes` that run `member`'s padded parameters as `member`."""
    inv_freq = np.zeros(packed.head_dim // 2, np.float32)
    inv_freq[: member.head_dim // 2] = model.rope_inverse_frequencies(member)
    return model.MemberSizes(
        layer_active=np.arange(packed.num_hidden_layers) < member.num_hidden_layers,
        hidden_size=np.float32(member.hidden_size),
        inv_freq=inv_freq,
        # As the model's own: 1 / sqrt(head_dim) in float64, rounded to float32.
        attention_scale=np.float32(1.0 / math.sqrt(member.head_dim)),
    )


def stack(trees):
    """Pytrees of one structure stacked on a new leading member axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pad_and_stack(members_params, members, packed):
    # One program: padding leaf by leaf outside a jit would compile every op for every shape.
    return stack(
        [pad_params(params, m, packed) for params, m in zip(members_params, members, strict=True)]
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpad_one(params, index, member, packed):
    return unpad_params(jax.tree.map(lambda x: x[index], params), member, packed)


@dataclasses.dataclass(frozen=True)
class Pack:
    """Members' models packed into one: the packed config and graphdef, the members' padded
    parameters and their sizes, each stacked on a leading member axis."""

    config: model.LlamaConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    sizes: model.MemberSizes
    members: tuple[model.LlamaConfig, ...]


def pack(members) -> Pack:
    """`members`: (LlamaConfig, parameters) pairs, each parameters of its config's shapes."""
    configs = tuple(config for config, _ in members)
    packed = packed_config(configs)
    graphdef, _ = jax.eval_shape(functools.partial(model.init, packed), jax.random.key(0))
    return Pack(
        config=packed,
        graphdef=graphdef,
        params=_pad_and_stack([params for _, params in members], configs, packed),
        sizes=jax.tree.map(
            lambda *xs: jnp.asarray(np.stack(xs)), *[member_sizes(c, packed) for c in configs]
        ),
        members=configs,
    )


def member_params(pack_: Pack, index: int):
    """Member `index`'s own parameters (its shapes) out of the pack."""
    return _unpad_one(pack_.params, index, pack_.members[index], pack_.config)


def apply(graphdef, params, sizes, input_ids, positions, attention_mask):
    """`model.apply` of every packed member (leading member axis on params, sizes and the
    inputs): float32 logits [members, B, L, V]. Call it inside a jit."""
    return jax.vmap(lambda p, s, ids, pos, mask: model.apply(graphdef, p, ids, pos, mask, sizes=s))(
        params, sizes, input_ids, positions, attention_mask
    )
