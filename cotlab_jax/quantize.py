"""Post-training quantization of the lab's Llama with qwix, used functionally.

    qgraphdef, qparams = quantize(config, graphdef, params, "w8")
    logits = model.apply(qgraphdef, qparams, ids, positions, mask)      # as a dense model
    tokens, _, _ = decode.greedy_decode(qgraphdef, qparams, prompts, prompt_mask, 4)
    metrics = evaluate.evaluate(qgraphdef, qparams, eval_set, spec, batch_size=64, ...)
    weight_bytes(qparams)                                               # bytes as stored

The result is an ordinary (graphdef, state) pair: anything that takes the model that way (the
forward pass, KV-cache greedy decoding, the evaluation) runs the quantized model unchanged.

Schemes (`SCHEMES`), all symmetric absmax round-to-nearest with no calibration data:
- `w8`: int8 weights, one float32 scale per output channel (the weight's axes that are not
  contracted); activations stay in the compute dtype. Each weight is dequantized (int8 x scale)
  right before its matmul, so this saves memory and weight bandwidth, not arithmetic.
- `w4`: the same with int4 weights (16 levels instead of 256, so about 17x the rounding step).
- `w8a8`: int8 weights as `w8`, and each matmul's input quantized to int8 on the fly (dynamic
  range, one scale per token); the matmul runs int8 x int8 with int32 accumulation and the
  product is rescaled.
- `fp8`: as `w8a8` with float8 e4m3 for weights and activations (scales map the absmax to 448).

Which layers are quantized, and why:
- Quantized: in every decoder layer, the seven weight matmuls: q, k, v and o projections and the
  MLP's gate, up and down projections. They hold all but the embedding of the parameters (over
  99% of the reference depth-4 model's).
- Not quantized: the (tied) token embedding and output head, the norms' scales, rotary
  embeddings, the attention scores and probabilities, and the key/value cache. The embedding
  table is read by a gather (which qwix does not intercept) and, tied, also by the head, whose
  logits are what the accuracy rests on; it is a small share of the bytes at this vocabulary
  (1024). The attention's q.k and p.v products multiply two activations (no weight to store), and
  on a GPU cuDNN attention computes them without an einsum at all, so quantizing them would make
  the result depend on the attention backend. Norms are elementwise.

How it uses qwix (`qwix.PtqProvider` with one `qwix.QuantizationRule`, `qwix.quantize_model`):
qwix intercepts `jnp.einsum` while a quantized module's `__call__` runs; in its first call it
replaces each einsum's weight (a module `nnx.Param`) by a quantized `WithAux` array. Two things
of this model's code need care, neither needing a change to `cotlab_jax.model`:
1. The layers are stacked along a leading `layers` axis and run by `lax.scan` over
   `nnx.merge`d slices. Calling `qwix.quantize_model` on the whole `Llama` fails: inside the
   scan each weight's slice still carries the stacked `('layers', ...)` sharding names, which
   qwix asserts against the slice's shape, and a weight replaced inside the scan would be lost
   anyway (it lands on a per-step copy of the block). So `quantize` runs `qwix.quantize_model`
   on the stacked `Block` under `nnx.vmap` over the layer axis (the same transform the model
   builds it with): each layer is quantized as a standalone block and the quantized weights come
   back stacked, with `layers` prepended to their sharding names again. Only the block's class
   is intercepted; `Llama.__call__` is qwix-free and scans the quantized blocks.
2. The model casts each weight as `self.w[...].astype(dtype)`. qwix's `WithAux.astype` fails
   on the unboxed quantized array that `[...]` returns (qwix's own layers never cast after
   indexing), so the quantized weights are rewrapped in `_CastableWithAux`, a `WithAux` whose
   `astype` casts the quantized array's scale (the dtype it dequantizes to), as qwix's own
   extensions subclass `WithAux` (e.g. `qwix.contrib.smooth_quant.WithSqScale`).
   qwix recognises an einsum operand as a weight by identity with a module's Param; it cannot
   follow that cast back to the Param under vmap, and its fallback (matching shapes) is
   ambiguous here (k and v, gate and up have equal shapes). So the quantizing call gets a
   float32 example, which makes the model's casts no-ops whatever its compute dtype.
The provider is `_WeightEinsumProvider`, a `qwix.PtqProvider` that leaves einsums with a batch
axis shared by both operands (activation by activation: attention) to plain `jnp.einsum`.

A model hook that would remove both workarounds: per-layer modules with weights read as
`self.w[...]` without a cast (as flax's `nnx.Linear`), or the cast done by qwix's intercepted
`promote_dtype`.
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from qwix._src.providers import ptq  # WithAux, which qwix's own extensions subclass

from cotlab_jax.config import ConfigError
from cotlab_jax.model import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A quantization scheme: the weights' type and, or None, the matmul inputs' type."""

    weight_qtype: jax.typing.DTypeLike
    act_qtype: jax.typing.DTypeLike | None


SCHEMES = {
    "w8": Scheme(jnp.int8, None),
    "w4": Scheme(jnp.int4, None),
    "w8a8": Scheme(jnp.int8, jnp.int8),
    "fp8": Scheme(jnp.float8_e4m3fn, jnp.float8_e4m3fn),
}


@flax.struct.dataclass
class _CastableWithAux(ptq.WithAux):
    """qwix's quantized weight, castable after `[...]` (see the module docstring, point 2)."""

    def astype(self, dtype):
        return self.replace(array=self.array.astype(dtype))


nnx.register_data_type(_CastableWithAux)


def _is_weight_einsum(spec: str) -> bool:
    """True for a two-operand einsum with no batch axis (one in both operands and the output):
    an activation times a weight, as "bld,dm->blm"; attention's "BTNH,BSNH->BNTS" is not."""
    inputs, arrow, output = spec.replace(" ", "").partition("->")
    operands = inputs.split(",")
    if not arrow or len(operands) != 2:
        return False
    lhs, rhs = operands
    return not set(lhs) & set(rhs) & set(output)


class _WeightEinsumProvider(qwix.PtqProvider):
    """`qwix.PtqProvider` that quantizes only einsums of an activation by a weight."""

    def einsum(self, einsum_str, *operands, **kwargs):
        if not _is_weight_einsum(einsum_str):
            # Inside a provider's handler its interception is off: this is plain jnp.einsum.
            return jnp.einsum(einsum_str, *operands, **kwargs)
        return super().einsum(einsum_str, *operands, **kwargs)


def check_scheme(scheme: str) -> Scheme:
    if scheme not in SCHEMES:
        raise ConfigError(
            f"quantize.scheme={scheme!r} is invalid: expected one of {tuple(SCHEMES)}."
        )
    return SCHEMES[scheme]


def _make_weights_castable(module: nnx.Module) -> None:
    for _, submodule in nnx.iter_modules(module):
        for name, value in list(vars(submodule).items()):
            if type(value) is ptq.WithAux:
                setattr(submodule, name, _CastableWithAux(array=value.array, how=value.how))


def _unquantized_matrices(stacked_block: nnx.Module) -> list[str]:
    """Paths of the stacked block's weight matrices (Params of a layer axis and 2 or more axes)
    left unquantized."""
    return [
        "/".join(map(str, path + (name,)))
        for path, submodule in nnx.iter_modules(stacked_block)
        for name, value in vars(submodule).items()
        if isinstance(value, nnx.Param) and value.ndim >= 3
    ]


def quantize(
    config: LlamaConfig, graphdef: nnx.GraphDef, params: nnx.State, scheme: str
) -> tuple[nnx.GraphDef, nnx.State]:
    """The model quantized by `scheme` (one of `SCHEMES`), as a (graphdef, state) pair that
    `model.apply`, `decode.greedy_decode` and `evaluate.evaluate` take like a dense model's.

    `params` is left as it is. Traces each layer once on a 2-token example; the result does not
    depend on the example (weights are quantized by their own range, activations by theirs at
    every call).
    """
    chosen = check_scheme(scheme)
    rule = qwix.QuantizationRule(
        module_path=".*",
        op_names=("einsum",),
        weight_qtype=chosen.weight_qtype,
        act_qtype=chosen.act_qtype,
    )
    provider = _WeightEinsumProvider([rule])
    length = 2
    # A float32 example whatever the compute dtype: the layers cast their weights to the
    # input's dtype, a no-op here, so qwix recognises each weight by identity. (It cannot trace
    # a cast back to the weight under vmap, and its fallback, matching shapes, is ambiguous: k
    # and v, gate and up have equal shapes.) How a weight is quantized does not depend on it.
    x = jax.random.normal(jax.random.key(0), (1, length, config.hidden_size), jnp.float32)
    positions = jnp.arange(length)[None]
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def quantize_layers(block):
        # The accelerator formulation (cpu=False): its projections are the einsums qwix intercepts.
        quantized = qwix.quantize_model(
            block, provider, x, positions, causal, None, 0, False, False
        )
        _make_weights_castable(quantized)
        return quantized

    graphdefs = []

    def quantized_state(params):
        llama = nnx.merge(graphdef, params, copy=True)
        # On every platform: the CPU formulation's flat matmuls are not einsums, so qwix would
        # not run the quantized products there.
        llama.config = dataclasses.replace(llama.config, formulation="accelerator")
        llama.layers = quantize_layers(llama.layers)
        missed = _unquantized_matrices(llama.layers)
        if missed:
            raise RuntimeError(
                f"qwix left these layer weights unquantized: {missed}; every weight matrix of "
                "a layer is expected to be the second operand of a jnp.einsum"
            )
        quantized_graphdef, state = nnx.split(llama)
        graphdefs.append(quantized_graphdef)  # static, so it leaves the trace as it is
        return state

    # One compiled program instead of every op of the quantization and the example call run
    # eagerly (and compiled one by one).
    state = jax.jit(quantized_state)(params)
    return graphdefs[0], state


def _bits(dtype) -> int:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits
    return jnp.finfo(dtype).bits


def weight_bytes(state) -> int:
    """Bytes of a (dense or quantized) state's arrays as stored: elements x bits / 8 per array,
    so int4 counts half a byte (packed, as on disk; a CPU may hold one per byte in memory)."""
    return sum(int(np.prod(leaf.shape)) * _bits(leaf.dtype) // 8 for leaf in jax.tree.leaves(state))


def dequantized(params: nnx.State, quantized_state: nnx.State) -> nnx.State:
    """`params` (a dense model's state) with every weight that `quantized_state` holds
    quantized replaced by its stored value times its scale, in float32. For the weight-only
    schemes (`w8`, `w4`) the dense model on these weights computes what the quantized one does;
    with `w8a8` and `fp8` it lacks the activations' quantization."""
    pure = nnx.to_pure_dict(params)

    def replace(dense: dict, quantized: dict) -> None:
        for name, value in quantized.items():
            if isinstance(value, dict) and set(value) == {"array"}:
                stored = value["array"]
                dense[name] = jnp.asarray(stored["qvalue"]).astype(jnp.float32) * stored["scale"]
            elif isinstance(value, dict):
                replace(dense[name], value)

    replace(pure, nnx.to_pure_dict(quantized_state))
    state = nnx.clone(params)
    nnx.replace_by_pure_dict(state, pure)
    return state
