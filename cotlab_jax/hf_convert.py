"""Conversion between this model and Hugging Face `transformers.LlamaForCausalLM`.

State dicts are plain `{name: numpy array}` with HF's names and layouts (a torch `Linear`
weight is [out, in]), so nothing here imports torch:

    hf_model.load_state_dict({k: torch.from_numpy(v) for k, v in to_hf_state_dict(...).items()})
    state = from_hf_state_dict({k: v.numpy() for k, v in hf_model.state_dict().items()}, config)

Configs: `transformers.LlamaConfig(**to_hf_config(config))`, and `from_hf_config(d)` reads a
`LlamaConfig.to_dict()` or a `config.json`, in the current (`rope_parameters`) or the legacy
(`rope_theta` + `rope_scaling`) form.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotlab_jax.model import Llama3RopeScaling, LlamaConfig, init

# Our per-layer parameter path -> HF name within `model.layers.{i}.`. Our projections are
# [in, ...out] (q: [embed, heads, head_dim]; o: [heads, head_dim, embed]); HF's are [out, in].
_LAYER_PARAMS = {
    ("self_attn", "q_proj"): "self_attn.q_proj.weight",
    ("self_attn", "k_proj"): "self_attn.k_proj.weight",
    ("self_attn", "v_proj"): "self_attn.v_proj.weight",
    ("self_attn", "o_proj"): "self_attn.o_proj.weight",
    ("mlp", "gate_proj"): "mlp.gate_proj.weight",
    ("mlp", "up_proj"): "mlp.up_proj.weight",
    ("mlp", "down_proj"): "mlp.down_proj.weight",
    ("input_layernorm", "scale"): "input_layernorm.weight",
    ("post_attention_layernorm", "scale"): "post_attention_layernorm.weight",
}


def _to_hf_layout(path: tuple[str, ...], ours: np.ndarray) -> np.ndarray:
    if ours.ndim == 1:  # norm scales
        return ours
    if path[-1] == "o_proj":  # [heads, head_dim, embed] -> [embed, heads * head_dim]
        return ours.reshape(-1, ours.shape[-1]).T
    # [embed, (heads, head_dim) | mlp] and [mlp, embed] -> [out, in]
    return ours.reshape(ours.shape[0], -1).T


def to_hf_state_dict(state: nnx.State, config: LlamaConfig) -> dict[str, np.ndarray]:
    """HF `LlamaForCausalLM` state dict (float32 numpy arrays) of our model's state.

    `lm_head.weight` is always present, as in HF's own `state_dict()`; when the embeddings are
    tied it is the embedding matrix.
    """
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(state))

    def copy(array) -> np.ndarray:
        # Writable (torch.from_numpy) and C-ordered: writers such as safetensors.numpy save an
        # array's memory as it lies, so a transposed (Fortran-ordered) view would load transposed.
        return np.array(array, np.float32, order="C")

    out = {"model.embed_tokens.weight": copy(params["embed_tokens"])}
    for layer in range(config.num_hidden_layers):
        for path, hf_name in _LAYER_PARAMS.items():
            stacked = params["layers"][path[0]][path[1]]
            out[f"model.layers.{layer}.{hf_name}"] = copy(_to_hf_layout(path, stacked[layer]))
    out["model.norm.weight"] = copy(params["norm"]["scale"])
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    else:
        out["lm_head.weight"] = copy(params["lm_head"].T)
    return out


def from_hf_state_dict(state_dict: dict[str, np.ndarray], config: LlamaConfig) -> nnx.State:
    """Our model's state (float32) from an HF `LlamaForCausalLM` state dict of numpy arrays.

    With tied embeddings `lm_head.weight` is ignored. Raises `ValueError` naming any missing,
    unexpected or mis-shaped tensor.
    """
    _, state = jax.eval_shape(functools.partial(init, config), jax.random.key(0))
    shapes = nnx.to_pure_dict(jax.tree.map(lambda x: x.shape, state))
    remaining = dict(state_dict)
    if config.tie_word_embeddings:
        remaining.pop("lm_head.weight", None)

    def take(name: str) -> np.ndarray:
        if name not in remaining:
            raise ValueError(f"HF state dict has no {name!r}")
        return np.asarray(remaining.pop(name), np.float32)

    def checked(name: str, array: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
        if array.shape != tuple(shape):
            raise ValueError(f"{name!r} converts to shape {array.shape}, expected {shape}")
        return jnp.asarray(array)

    params = {
        "embed_tokens": checked(
            "model.embed_tokens.weight", take("model.embed_tokens.weight"), shapes["embed_tokens"]
        ),
        "norm": {
            "scale": checked(
                "model.norm.weight", take("model.norm.weight"), shapes["norm"]["scale"]
            )
        },
        "layers": {},
    }
    for path, hf_name in _LAYER_PARAMS.items():
        stacked_shape = shapes["layers"][path[0]][path[1]]
        layer_shape = stacked_shape[1:]
        hf_shape = _to_hf_layout(path, np.empty(layer_shape)).shape
        layers = []
        for layer in range(config.num_hidden_layers):
            name = f"model.layers.{layer}.{hf_name}"
            hf = take(name)
            if hf.shape != hf_shape:
                raise ValueError(f"{name!r} has shape {hf.shape}, expected {hf_shape}")
            layers.append(hf.T.reshape(layer_shape))  # inverts _to_hf_layout
        params["layers"].setdefault(path[0], {})[path[1]] = jnp.asarray(np.stack(layers))
    if not config.tie_word_embeddings:
        params["lm_head"] = checked("lm_head.weight", take("lm_head.weight").T, shapes["lm_head"])
    if remaining:
        raise ValueError(f"HF state dict has tensors this config does not use: {sorted(remaining)}")
    nnx.replace_by_pure_dict(state, params)
    return state


def to_hf_config(config: LlamaConfig) -> dict:
    """Keyword arguments for `transformers.LlamaConfig(**d)` describing the same model."""
    rope_parameters = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if config.rope_scaling is not None:
        rope_parameters.update(config.rope_scaling.to_dict())
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope_parameters,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=config.padding_idx,  # HF's embedding takes it as its padding_idx
    )


def from_hf_config(hf_config: dict, **overrides) -> LlamaConfig:
    """Our `LlamaConfig` from an HF Llama config dict; `overrides` set fields HF has no word
    for (dtype, remat_policy, attention_impl) or replace any other."""
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config['hidden_act']!r}: only 'silu' is supported")
    for bias in ("attention_bias", "mlp_bias"):
        if hf_config.get(bias):
            raise ValueError(f"{bias}=True: this model has no biases")
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1: this model rotates whole heads")
    if rope["rope_type"] == "llama3":
        rope.setdefault(
            "original_max_position_embeddings", hf_config.get("max_position_embeddings", 2048)
        )
    num_attention_heads = hf_config["num_attention_heads"]
    values = dict(
        vocab_size=hf_config["vocab_size"],
        num_hidden_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_attention_heads=num_attention_heads,
        num_key_value_heads=hf_config.get("num_key_value_heads") or num_attention_heads,
        head_dim=hf_config.get("head_dim"),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=Llama3RopeScaling.from_dict(rope),
        tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
        initializer_range=hf_config.get("initializer_range", 0.02),
        padding_idx=hf_config.get("pad_token_id"),
    )
    values.update(overrides)
    return LlamaConfig(**values)
