"""The reference's Llama decoder (docs/tasks.md section 5) in Flax NNX, used functionally.

    graphdef, state = init(config, key)              # split once
    logits = apply(graphdef, state, ids, positions, mask)   # jit over the state pytree

Numerically it is Hugging Face's `LlamaForCausalLM` (see `cotlab_jax.hf_convert`): RMSNorm,
rotary embeddings with rotate-half pairing and optional llama3 frequency scaling, grouped-query
attention, SwiGLU MLP, no biases, tied or untied output embedding. Parameters are float32 and
cast to the compute dtype (`config.dtype`) where used; norms, rotary angles and softmax run in
float32 and logits come back in float32.

The layers' parameters are stacked along a leading `layers` axis. On accelerators one
`lax.scan` runs them, so compile time does not grow with depth. XLA:CPU runs another layout of
the same math faster (`LlamaConfig.formulation`, chosen per platform when lowering): layers
unrolled, projections as 2-D matmuls and attention with a hand-written backward, which spare
the CPU the scan's stacking copies and the transposing copies of wide activations in the
backward pass. Every parameter carries logical axis names (`embed`,
`vocab`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`) as flax `out_sharding` metadata,
which `cotlab_jax.sharding` maps onto a mesh.

Sequences are left-padded: `attention_mask` marks real tokens, and callers pass `positions`
(cumsum(mask) - 1), so padding never shifts a token's rotary position.

A smaller model can run inside a larger one's shapes (`cotlab_jax.size_packing`): its parameters
zero-padded and `MemberSizes` passed as `sizes`, which skips its padded layers and gives RMSNorm,
rotary embeddings and the attention scale its own widths. Without `sizes` none of it is traced.
"""

import contextlib
import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotlab_jax import sharding
from cotlab_jax.config import check_number, fail, is_int

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# "none", "full" (save nothing), or a jax.checkpoint_policies policy that takes no arguments.
REMAT_POLICIES = (
    "none",
    "full",
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
)
ROPE_TYPES = ("default", "llama3")
# "auto": "highest" (true float32 products) with float32 compute, JAX's default with bfloat16.
MATMUL_PRECISIONS = ("auto", "default", "high", "highest")
# How the same math is laid out for the compiler (see `Llama.__call__`); "auto" picks per
# platform when lowering.
FORMULATIONS = ("auto", "cpu", "accelerator")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's rotary frequency scaling (HF `rope_type="llama3"`)."""

    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 1000

    def __post_init__(self):
        field = "model.rope_scaling"
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            check_number(
                f"{field}.{name}",
                value,
                lambda x: x > 0,
                "expected a positive number",
                allow_inf=False,
            )
        if self.high_freq_factor <= self.low_freq_factor:
            fail(
                f"{field}.high_freq_factor",
                self.high_freq_factor,
                f"expected more than low_freq_factor={self.low_freq_factor}",
            )
        if not (
            is_int(self.original_max_position_embeddings)
            and self.original_max_position_embeddings > 0
        ):
            fail(
                f"{field}.original_max_position_embeddings",
                self.original_max_position_embeddings,
                "expected a positive integer",
            )

    @classmethod
    def from_dict(cls, rope_scaling) -> "Llama3RopeScaling | None":
        """From `config.model.rope_scaling`: None, {"rope_type": "default"} or a llama3 dict."""
        if rope_scaling is None:
            return None
        rope_scaling = dict(rope_scaling)
        rope_type = rope_scaling.pop("rope_type", rope_scaling.pop("type", None))
        if rope_type not in ROPE_TYPES:
            fail("model.rope_scaling.rope_type", rope_type, f"expected one of {ROPE_TYPES}")
        if rope_type == "default":
            return None
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(rope_scaling) - names)
        if unknown:
            fail("model.rope_scaling", unknown, f"unknown keys; llama3 takes {sorted(names)}")
        return cls(**rope_scaling)

    def to_dict(self) -> dict:
        return dict(rope_type="llama3", **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The decoder's hyperparameters; validated on construction (raises `ConfigError`).

    Defaults are the reference's depth-4 model. `head_dim=None` means
    hidden_size // num_attention_heads. `matmul_precision` applies to every matmul, einsum and
    attention product of the model (`MATMUL_PRECISIONS`). `padding_idx`: as torch's
    `nn.Embedding(padding_idx=...)` (the reference sets V-1 with special tokens), that embedding
    row starts at zero and the lookup passes it no gradient (a tied output head still does).
    `formulation`: "accelerator" runs the layers in one `lax.scan` (compile time flat in depth)
    with batched einsums; "cpu" unrolls the layers and runs projections as 2-D matmuls, which
    XLA:CPU runs faster; "auto" picks per platform when lowering. Hashable, so it can sit in a
    jit-static graphdef.
    """

    vocab_size: int
    num_hidden_layers: int = 4
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    rope_scaling: Llama3RopeScaling | None = Llama3RopeScaling()
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str = "auto"
    matmul_precision: str = "auto"
    padding_idx: int | None = None
    formulation: str = "auto"

    def __post_init__(self):
        if not (is_int(self.vocab_size) and self.vocab_size > 0):
            fail("data.vocab_size", self.vocab_size, "expected a positive integer")
        for name in (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            value = getattr(self, name)
            if not (is_int(value) and value > 0):
                fail(f"model.{name}", value, "expected a positive integer")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                fail(
                    "model.hidden_size",
                    self.hidden_size,
                    f"with head_dim=None it must be divisible by num_attention_heads="
                    f"{self.num_attention_heads}; or set model.head_dim",
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not (is_int(self.head_dim) and self.head_dim > 0 and self.head_dim % 2 == 0):
            fail(
                "model.head_dim",
                self.head_dim,
                "expected a positive even integer (rotary embeddings rotate pairs), or None",
            )
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                "model.num_key_value_heads",
                self.num_key_value_heads,
                f"expected a divisor of num_attention_heads={self.num_attention_heads}",
            )
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            check_number(
                f"model.{name}",
                value,
                lambda x: x > 0,
                "expected a positive number",
                allow_inf=False,
            )
        if not (self.rope_scaling is None or isinstance(self.rope_scaling, Llama3RopeScaling)):
            fail(
                "model.rope_scaling",
                self.rope_scaling,
                "expected None or a Llama3RopeScaling (see LlamaConfig.from_config)",
            )
        if not isinstance(self.tie_word_embeddings, bool):
            fail("model.tie_word_embeddings", self.tie_word_embeddings, "expected a bool")
        if self.dtype not in DTYPES:
            fail("model.dtype", self.dtype, f"expected one of {tuple(DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            fail("model.remat_policy", self.remat_policy, f"expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("model.attention_impl", self.attention_impl, f"expected one of {ATTENTION_IMPLS}")

        if self.matmul_precision not in MATMUL_PRECISIONS:
            fail(
                "model.matmul_precision",
                self.matmul_precision,
                f"expected one of {MATMUL_PRECISIONS}",
            )
        if self.padding_idx is not None and not (
            is_int(self.padding_idx) and 0 <= self.padding_idx < self.vocab_size
        ):
            fail(
                "model.padding_idx",
                self.padding_idx,
                f"expected None or a token id in [0, vocab_size={self.vocab_size})",
            )
        if self.formulation not in FORMULATIONS:
            fail("model.formulation", self.formulation, f"expected one of {FORMULATIONS}")

    @classmethod
    def from_config(cls, model_cfg, vocab_size: int, padding_idx: int | None = None):
        """From the project's `config.model` group and `config.data.vocab_size`; `padding_idx`
        is the pad token's id when the prompts use special tokens (as the reference), else None.
        """
        fields = {field.name for field in dataclasses.fields(cls)} - {"vocab_size", "padding_idx"}
        values = dict(model_cfg)
        unknown = sorted(set(values) - fields)
        if unknown:
            fail("model", unknown, f"unknown fields; known are {sorted(fields)}")
        values["rope_scaling"] = Llama3RopeScaling.from_dict(values.get("rope_scaling"))
        return cls(vocab_size=vocab_size, padding_idx=padding_idx, **values)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def resolved_matmul_precision(self) -> str | None:
        """The precision name for `jax.default_matmul_precision`; None keeps JAX's default."""
        if self.matmul_precision == "auto":
            return "highest" if self.dtype == "float32" else None
        return self.matmul_precision


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MemberSizes:
    """A smaller model's own sizes inside the shapes of a larger config (arrays, so they can be
    vmapped over size-packed members; `cotlab_jax.size_packing` makes them).

    layer_active: bool [layers], False for padded layers, which leave the residual stream as is.
    hidden_size: float32 scalar, the member's width: RMSNorm divides by it (padded dims are 0).
    inv_freq: float32 [head_dim // 2], the member's rotary frequencies (zeros past its own).
    attention_scale: float32 scalar, 1 / sqrt(the member's head_dim).
    """

    layer_active: jax.Array
    hidden_size: jax.Array
    inv_freq: jax.Array
    attention_scale: jax.Array


def _param(key, shape, axes, std):
    """A float32 parameter drawn normal(0, std), annotated with logical axis names.

    `eager_sharding=False`: parameters are created unsharded (or sharded by a jit's
    out_shardings, see `init_sharded`), whatever mesh is current.
    """
    return nnx.Param(
        std * jax.random.normal(key, shape, jnp.float32), out_sharding=axes, eager_sharding=False
    )


class RMSNorm(nnx.Module):
    def __init__(self, config: LlamaConfig):
        self.eps = config.rms_norm_eps
        self.scale = nnx.Param(
            jnp.ones((config.hidden_size,), jnp.float32),
            out_sharding=("embed",),
            eager_sharding=False,
        )

    def __call__(self, x, width=None):
        """`width` (traced, optional): the true width of a zero-padded x, the mean's divisor."""
        # As HF: normalise in float32, round to the compute dtype, then scale.
        x32 = x.astype(jnp.float32)
        if width is None:
            mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        else:
            mean_square = jnp.sum(x32 * x32, axis=-1, keepdims=True) / width
        normed = x32 * jax.lax.rsqrt(mean_square + self.eps)
        scale = self.scale[...].astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return scale * normed.astype(x.dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair rotary frequencies [head_dim // 2], with llama3 scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    # HF `_compute_llama3_parameters`: keep high frequencies, divide low ones by `factor`,
    # interpolate smoothly in between.
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotates x [B, L, heads, head_dim] by positions [B, L] (HF's rotate-half pairing)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq[None, None, :]  # [B, L, hd / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _attention_implementation(config: LlamaConfig, query, key) -> str:
    """The `jax.nn.dot_product_attention` implementation, "xla" or "cudnn", resolving "auto"."""
    on_gpu = jax.default_backend() == "gpu"
    if config.attention_impl == "cudnn":
        if not on_gpu:
            fail(
                "model.attention_impl",
                "cudnn",
                f"cuDNN attention needs a GPU backend, this one is {jax.default_backend()!r}",
            )
        return "cudnn"
    if config.attention_impl == "xla":
        return "xla"
    # cuDNN flash attention takes 16-bit inputs, head dims that are multiples of 8 up to 128
    # (256 on Hopper), and, when a mask is given and gradients are taken, even lengths.
    fits = (
        query.dtype == jnp.bfloat16
        and config.head_dim % 8 == 0
        and config.head_dim <= 128
        and query.shape[1] % 2 == 0
        and key.shape[1] % 2 == 0
    )
    return "cudnn" if on_gpu and fits else "xla"


def project(spec: str, x, w, flat: bool, preferred_element_type=None):
    """`jnp.einsum(spec, x, w)` for a projection: x's trailing axes contract with w's leading ones.

    flat (the CPU formulation, see `Llama.__call__`): the same product as one 2-D matmul over
    the flattened tokens, [tokens, in] @ [in, out]. Its autodiff weight gradient is then a
    plain x^T g that XLA:CPU runs without first transposing the output gradient g (the batched
    einsum's gradient made it copy g [tokens, out] transposed, the slowest op of a CPU step).
    """
    if not flat:
        return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
    x_axes, w_axes = spec.split("->")[0].split(",")
    contracted = len(set(x_axes) & set(w_axes))
    lead = x.shape[: x.ndim - contracted]
    out = w.shape[contracted:]
    product = jnp.matmul(
        x.reshape(math.prod(lead), -1),
        w.reshape(math.prod(w.shape[:contracted]), -1),
        preferred_element_type=preferred_element_type,
    )
    return product.reshape(*lead, *out)


_MASKED_SCORE = -0.7 * float(np.finfo(np.float32).max)  # as jax.nn.dot_product_attention's


def cpu_attention(query, key, value, mask, scale=None):
    """`jax.nn.dot_product_attention(query, key, value, mask=mask)` (its XLA path's numbers:
    float32 scores and softmax, a fully masked row uniform), laid out for XLA:CPU: queries are
    grouped per KV head as [B, kv, groups, L, hd] up front and the backward pass is written out,
    so no [B, heads, L, S] tensor is transposed (the batched einsums' output order and autodiff
    did: copies of the probabilities and their gradients in every layer).

    query [B, L, heads, hd]; key, value [B, S, kv_heads, hd]; mask [B, 1, L, S] (True = attend).
    `scale` (float32, may be traced): the scores' factor; None: 1 / sqrt(hd).
    """
    batch, length, heads, head_dim = query.shape
    # A given scale is a constant of the model: the backward passes it no gradient.
    scale = None if scale is None else jax.lax.stop_gradient(scale)
    kv_heads = key.shape[2]
    grouped = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    grouped = jnp.transpose(grouped, (0, 2, 3, 1, 4))
    precision = jax.config.jax_default_matmul_precision
    out = _grouped_attention(grouped, key, value, mask, scale, precision)  # [B, kv, groups, L, hd]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(query.shape)


def _score_factor(scale, head_dim: int):
    """The scores' factor: `scale`, or 1 / sqrt(head_dim) where it is None."""
    return jnp.float32(1.0 / math.sqrt(head_dim)) if scale is None else scale


def _grouped_scores(query, key, mask, scale, precision):
    """Masked, scaled float32 scores [B, kv, groups, L, S] of query [B, kv, groups, L, hd]."""
    scores = jnp.einsum(
        "bkgld,bskd->bkgls", query, key, precision=precision, preferred_element_type=jnp.float32
    )
    scores = scores * _score_factor(scale, query.shape[-1])
    return jnp.where(mask[:, :, None], scores, _MASKED_SCORE)


def _grouped_attention_forward(query, key, value, mask, scale, precision):
    probs = jax.nn.softmax(_grouped_scores(query, key, mask, scale, precision), axis=-1)
    out = jnp.einsum("bkgls,bskd->bkgld", probs.astype(value.dtype), value, precision=precision)
    return out, (query, key, value, mask, scale, probs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _grouped_attention(query, key, value, mask, scale, precision):
    return _grouped_attention_forward(query, key, value, mask, scale, precision)[0]


def _grouped_attention_backward(precision, residuals, d_out):
    query, key, value, mask, scale, probs = residuals
    d_probs = jnp.einsum(
        "bkgld,bskd->bkgls", d_out, value, precision=precision, preferred_element_type=jnp.float32
    )
    # Softmax's backward; masked scores were constants, so they get no gradient.
    d_scores = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
    d_scores = jnp.where(mask[:, :, None], d_scores, 0.0)
    d_scores = d_scores * _score_factor(scale, query.shape[-1])
    d_query = jnp.einsum("bkgls,bskd->bkgld", d_scores.astype(key.dtype), key, precision=precision)
    d_key = jnp.einsum(
        "bkgls,bkgld->bskd", d_scores.astype(query.dtype), query, precision=precision
    )
    d_value = jnp.einsum("bkgls,bkgld->bskd", probs.astype(d_out.dtype), d_out, precision=precision)
    d_scale = None if scale is None else jnp.zeros_like(scale)
    return d_query, d_key, d_value, None, d_scale


_grouped_attention.defvjp(_grouped_attention_forward, _grouped_attention_backward)


def attention_probabilities(query, key, mask, scale=None):
    """Float32 attention probabilities [B, heads, L, S], as `jax.nn.dot_product_attention`'s XLA
    path computes them: softmax over S of q·k / sqrt(head_dim) in float32, masked entries set to
    the same large negative number (so a fully masked row is uniform, not NaN).

    query [B, L, heads, hd]; key [B, S, kv_heads, hd]; mask [B, 1, L, S] (True = attend).
    Query head h reads key head h // (heads // kv_heads), as HF's `repeat_kv`. `scale` (may be
    traced): the scores' factor; default 1 / sqrt(head_dim).
    """
    groups = query.shape[2] // key.shape[2]
    key = jnp.repeat(key, groups, axis=2)
    scores = jnp.einsum("blhk,bshk->bhls", query, key, preferred_element_type=jnp.float32)
    scores = scores * _score_factor(scale, query.shape[-1])
    scores = jnp.where(mask, scores, -0.7 * float(np.finfo(np.float32).max))
    return jax.nn.softmax(scores, axis=-1)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        self.config = config
        d, h, kv, hd = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        std = config.initializer_range
        self.q_proj = _param(rngs.params(), (d, h, hd), ("embed", "heads", "head_dim"), std)
        self.k_proj = _param(rngs.params(), (d, kv, hd), ("embed", "kv_heads", "head_dim"), std)
        self.v_proj = _param(rngs.params(), (d, kv, hd), ("embed", "kv_heads", "head_dim"), std)
        self.o_proj = _param(rngs.params(), (h, hd, d), ("heads", "head_dim", "embed"), std)

    def __call__(
        self, x, positions, mask, kv_cache, cache_index, return_attention, cpu, sizes=None
    ):
        """x [B, L, D]; mask [B, 1, L, S] (True = attend); kv_cache None or (k, v) [B, S, KV, hd].

        Without a cache the keys are this call's tokens (S = L); with one, this call's keys and
        values are written into it at slot `cache_index` and attention runs over all S slots.
        Returns the output [B, L, D], the (updated) keys and values, and with `return_attention`
        (static) the float32 probabilities [B, heads, L, S] (else None). `cpu` (static): the
        CPU formulation (see `Llama.__call__`). `sizes`: None, or a packed member's `MemberSizes`
        (its rotary frequencies and attention scale).
        """
        dtype = x.dtype
        query = project("bld,dhk->blhk", x, self.q_proj[...].astype(dtype), cpu)
        key = project("bld,dhk->blhk", x, self.k_proj[...].astype(dtype), cpu)
        value = project("bld,dhk->blhk", x, self.v_proj[...].astype(dtype), cpu)
        inv_freq = rope_inverse_frequencies(self.config) if sizes is None else sizes.inv_freq
        # A packed member's scale is traced; an unpacked model keeps each function's default.
        scale = {} if sizes is None else dict(scale=sizes.attention_scale)
        query = sharding.constrain(
            apply_rope(query, positions, inv_freq), ("batch", "length", "heads", "head_dim")
        )
        key = apply_rope(key, positions, inv_freq)
        if kv_cache is not None:
            cache_key, cache_value = kv_cache
            key = jax.lax.dynamic_update_slice_in_dim(cache_key, key, cache_index, axis=1)
            value = jax.lax.dynamic_update_slice_in_dim(cache_value, value, cache_index, axis=1)
        key = sharding.constrain(key, ("batch", "length", "kv_heads", "head_dim"))
        value = sharding.constrain(value, ("batch", "length", "kv_heads", "head_dim"))
        if return_attention:
            # Explicit probabilities (never a fused kernel), also used for the output so the
            # logits are the normal path's up to float rounding.
            probs = attention_probabilities(query, key, mask, **scale)
            groups = query.shape[2] // value.shape[2]
            out = jnp.einsum(
                "bhls,bshk->blhk", probs.astype(dtype), jnp.repeat(value, groups, axis=2)
            )
        elif cpu:
            probs = None
            out = cpu_attention(query, key, value, mask, **scale)
        else:
            probs = None
            out = jax.nn.dot_product_attention(
                query,
                key,
                value,
                mask=mask,
                # cuDNN takes a static scale only: a packed member's runs on XLA.
                implementation=(
                    _attention_implementation(self.config, query, key) if sizes is None else "xla"
                ),
                **scale,
            )
        out = project("blhk,hkd->bld", out, self.o_proj[...].astype(dtype), cpu)
        return out, (key, value), probs


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        d, m, std = config.hidden_size, config.intermediate_size, config.initializer_range
        self.gate_proj = _param(rngs.params(), (d, m), ("embed", "mlp"), std)
        self.up_proj = _param(rngs.params(), (d, m), ("embed", "mlp"), std)
        self.down_proj = _param(rngs.params(), (m, d), ("mlp", "embed"), std)

    def __call__(self, x, cpu):
        dtype = x.dtype
        gate = project("bld,dm->blm", x, self.gate_proj[...].astype(dtype), cpu)
        up = project("bld,dm->blm", x, self.up_proj[...].astype(dtype), cpu)
        hidden = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return project("blm,md->bld", hidden, self.down_proj[...].astype(dtype), cpu)


class Block(nnx.Module):
    """One decoder layer: pre-norm attention and pre-norm SwiGLU MLP, each residual."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config)
        self.mlp = MLP(config, rngs)

    def __call__(
        self, x, positions, mask, kv_cache, cache_index, return_attention, cpu, sizes=None
    ):
        width = None if sizes is None else sizes.hidden_size
        attended, kv, probs = self.self_attn(
            self.input_layernorm(x, width),
            positions,
            mask,
            kv_cache,
            cache_index,
            return_attention,
            cpu,
            sizes,
        )
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x, width), cpu)
        return sharding.constrain(x, ("batch", "length", "embed")), kv, probs


def _decoder(
    config,
    layers_graphdef,
    layers_state,
    x,
    positions,
    mask,
    kv_cache,
    cache_index,
    head,
    norm,
    return_attention,
    cpu,
    sizes,
):
    """The layer stack, final norm and output head of `Llama.__call__`: (logits, cache, probs).

    `cpu` (static) picks the CPU formulation: layers unrolled and projections as 2-D matmuls
    (`project`); else one scan over the stacked layers and batched einsums. Same math.
    `sizes`: None, or a packed member's `MemberSizes`; its inactive layers keep x as it was.
    """

    def layer(x, layer_inputs):
        layer_state, layer_cache, active = layer_inputs
        block = nnx.merge(layers_graphdef, layer_state)
        new_x, kv, probs = block(
            x, positions, mask, layer_cache, cache_index, return_attention, cpu, sizes
        )
        x = new_x if active is None else jnp.where(active, new_x, x)
        # Scan stacks the per-layer outputs; a `None` (probs when off) adds nothing to it.
        return x, (kv, probs)

    active = None if sizes is None else sizes.layer_active
    if kv_cache is None:
        # Keys and values are not kept without a cache: `None` makes scan drop them.
        def body(x, layer_inputs):
            layer_state, active = layer_inputs
            x, (_, probs) = layer(x, (layer_state, None, active))
            return x, (None, probs)

        xs = (layers_state, active)
    else:
        body = layer
        xs = (layers_state, kv_cache, active)
    body = _remat(body, config.remat_policy)
    if not cpu:
        x, (new_cache, probs) = jax.lax.scan(body, x, xs)
    else:
        outputs = []
        for index in range(config.num_hidden_layers):
            x, output = body(x, jax.tree.map(operator.itemgetter(index), xs))
            outputs.append(output)
        new_cache, probs = jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *outputs)
    width = None if sizes is None else sizes.hidden_size
    logits = project("bld,dv->blv", norm(x, width), head, cpu, preferred_element_type=jnp.float32)
    return logits, new_cache, probs


def _remat(fn, policy_name: str):
    if policy_name == "none":
        return fn
    policy = None if policy_name == "full" else getattr(jax.checkpoint_policies, policy_name)
    # prevent_cse=False is safe (and faster) inside scan, which already keeps the forward and
    # the recomputation apart.
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


class Llama(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        self.config = config
        std = config.initializer_range
        self.embed_tokens = _param(
            rngs.params(), (config.vocab_size, config.hidden_size), ("vocab", "embed"), std
        )
        if config.padding_idx is not None:  # as torch's nn.Embedding(padding_idx=...)
            self.embed_tokens[...] = self.embed_tokens[...].at[config.padding_idx].set(0.0)

        # One Block whose parameters have a leading `layers` axis, one slice per layer.
        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs):
            return Block(config, rngs)

        self.layers = stacked_blocks(rngs)
        self.norm = RMSNorm(config)
        if not config.tie_word_embeddings:
            self.lm_head = _param(
                rngs.params(), (config.hidden_size, config.vocab_size), ("embed", "vocab"), std
            )

    def __call__(
        self,
        input_ids,
        positions,
        key_mask,
        kv_cache=None,
        cache_index=0,
        return_attention=False,
        sizes=None,
    ):
        """Logits [B, L, V] (float32) and the updated cache.

        input_ids, positions: [B, L]. Without a cache, key_mask [B, L] marks the real tokens.
        With a cache (k, v), each [layers, B, S, KV, hd], this call's tokens fill slots
        cache_index .. cache_index + L - 1 and key_mask [B, S] marks the slots that hold real
        tokens once they are written. Token i attends to the real slots up to its own.
        With `return_attention` (static) also the attention probabilities, float32
        [layers, B, heads, L, S], as a third output (see `apply`). `sizes`: None, or the
        `MemberSizes` of a smaller model whose zero-padded parameters this module holds.
        """
        precision = self.config.resolved_matmul_precision
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            return self._forward(
                input_ids, positions, key_mask, kv_cache, cache_index, return_attention, sizes
            )

    def _forward(
        self, input_ids, positions, key_mask, kv_cache, cache_index, return_attention, sizes
    ):
        config = self.config
        dtype = config.compute_dtype
        length = input_ids.shape[1]
        # The lookup reads a whole replicated table: a gather from a table sharded over vocab and
        # embed cannot produce batch-sharded rows without a full rematerialisation.
        table = sharding.constrain(self.embed_tokens[...].astype(dtype), (None, None))
        x = jnp.take(table, input_ids, axis=0)
        if config.padding_idx is not None:  # the padding row's lookups pass no gradient
            is_pad = (input_ids == config.padding_idx)[..., None]
            x = jnp.where(is_pad, jax.lax.stop_gradient(x), x)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        query_slots = cache_index + jnp.arange(length)
        key_slots = jnp.arange(key_mask.shape[1])
        causal = key_slots[None, :] <= query_slots[:, None]
        mask = causal[None, None] & key_mask.astype(bool)[:, None, None, :]

        layers_graphdef, layers_state = nnx.split(self.layers)
        if kv_cache is not None:
            kv_cache = tuple(
                sharding.constrain(c, ("layers", "batch", "length", "kv_heads", "head_dim"))
                for c in kv_cache
            )
        if config.tie_word_embeddings:
            head = self.embed_tokens[...].astype(dtype).T
        else:
            head = self.lm_head[...].astype(dtype)

        def decoder(x, layers_state, kv_cache, head, cpu):
            return _decoder(
                config,
                layers_graphdef,
                layers_state,
                x,
                positions,
                mask,
                kv_cache,
                cache_index,
                head,
                self.norm,
                return_attention,
                cpu,
                sizes,
            )

        if config.formulation == "auto":
            # XLA:CPU runs the CPU formulation faster. The branch is chosen when lowering, for
            # the platform compiled for (an ahead-of-time TPU compilation on a CPU host gets the
            # accelerator program), and XLA only ever sees that one.
            logits, new_cache, probs = jax.lax.platform_dependent(
                x,
                layers_state,
                kv_cache,
                head,
                cpu=functools.partial(decoder, cpu=True),
                default=functools.partial(decoder, cpu=False),
            )
        else:
            cpu = config.formulation == "cpu"
            logits, new_cache, probs = decoder(x, layers_state, kv_cache, head, cpu=cpu)
        logits = sharding.constrain(logits, ("batch", "length", "vocab"))
        if return_attention:
            return logits, new_cache, probs
        return logits, new_cache

    def init_cache(self, batch_size: int, cache_length: int):
        """An empty key/value cache: (k, v), each [layers, B, S, KV heads, head_dim]."""
        config = self.config
        shape = (
            config.num_hidden_layers,
            batch_size,
            cache_length,
            config.num_key_value_heads,
            config.head_dim,
        )
        return (jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype))


def init(config: LlamaConfig, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    """A freshly initialised model, split into its static graphdef and its parameter state.

    Works under `jax.eval_shape` (abstract state) and `jax.jit` (see `init_sharded`).
    """
    return nnx.split(Llama(config, rngs=nnx.Rngs(params=key)))


def init_sharded(config: LlamaConfig, key: jax.Array, mesh: jax.sharding.Mesh):
    """`init`, with the state created directly sharded over `mesh` by its logical axis rules."""
    graphdef, abstract_state = jax.eval_shape(functools.partial(init, config), key)
    shardings = sharding.state_shardings(abstract_state, mesh)
    state = jax.jit(lambda key: init(config, key)[1], out_shardings=shardings)(key)
    return graphdef, state


def apply(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids,
    positions,
    attention_mask,
    return_attention: bool = False,
    sizes: MemberSizes | None = None,
):
    """Float32 logits [B, L, V] for left-padded input_ids [B, L].

    positions: [B, L] rotary positions, cumsum(attention_mask) - 1 for left padding.
    attention_mask: [B, L], True/1 for real tokens. Call it inside a jit.
    return_attention (static): return (logits, probs) instead, probs the float32 attention
    probabilities [layers, B, heads, L, L] (row = query position, column = key position; rows
    of padding are uniform and meaningless). Off, the traced program is the normal one; on,
    attention runs unfused (`attention_probabilities`), with the same logits up to float
    rounding. Memory: 4 * layers * B * heads * L**2 bytes.
    sizes: None, or a size-packed member's `MemberSizes` (`cotlab_jax.size_packing`).
    """
    module = nnx.merge(graphdef, state)
    # Only a packed member passes sizes: any module with Llama's call signature runs unpacked.
    packed = {} if sizes is None else dict(sizes=sizes)
    if return_attention:
        logits, _, probs = module(
            input_ids, positions, attention_mask, return_attention=True, **packed
        )
        return logits, probs
    logits, _ = module(input_ids, positions, attention_mask, **packed)
    return logits


def positions_from_mask(attention_mask) -> jax.Array:
    """Rotary positions counting real tokens only: cumsum(mask) - 1 (pads get 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def count_params(state: nnx.State) -> int:
    """Number of parameters (a tied embedding counts once)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def matmul_params(config: LlamaConfig) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding lookup
    and norms (the output projection counts, tied or not)."""
    d, hd = config.hidden_size, config.head_dim
    attention = 2 * d * config.num_attention_heads * hd + 2 * d * config.num_key_value_heads * hd
    mlp = 3 * d * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + d * config.vocab_size


def flops_per_token(config: LlamaConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token at sequence length `seq_len`, for MFU (PaLM appendix B).

    Forward: 2 per matmul parameter, plus 4 * layers * heads * head_dim * seq_len for the
    attention scores and weighted values (causal masking not discounted). Training (forward and
    backward) is three times the forward.
    """
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    forward = 2 * matmul_params(config) + attention * seq_len
    return float(3 * forward if training else forward)
