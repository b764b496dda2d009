"""Small models, batches and weights shared by the model tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cotlab_jax import model


def tiny_config(**overrides) -> model.LlamaConfig:
    """A float32 model small enough for CPU tests, with non-trivial llama3 rope scaling (a
    factor of 8 over 16 original positions, so the scaled and smoothed bands are both hit) and
    weights large enough that logits are far from ties."""
    values = dict(
        vocab_size=64,
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        dtype="float32",
        initializer_range=0.2,
        rope_scaling=model.Llama3RopeScaling(8.0, 1.0, 4.0, 16),
    )
    values.update(overrides)
    return model.LlamaConfig(**values)


def random_state(config: model.LlamaConfig, seed: int):
    """(graphdef, state) with numpy-random weights: matrices normal(0, initializer_range), norm
    scales 1 + normal(0, 0.1). Much faster than `model.init` on CPU, where every new
    random-number shape costs an XLA compilation."""
    graphdef, abstract = jax.eval_shape(functools.partial(model.init, config), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if "scale" in jax.tree_util.keystr(path):
            values = 1 + rng.normal(0, 0.1, leaf.shape)
        else:
            values = rng.normal(0, config.initializer_range, leaf.shape)
        return jnp.asarray(values, jnp.float32)

    return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


def random_batch(seed: int, batch: int, length: int, vocab: int, pads=(0, 3, 7)):
    """Random ids, left-padded: row i has pads[i % len(pads)] pad tokens (id 0)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), bool)
    for row in range(batch):
        mask[row, : pads[row % len(pads)]] = False
    ids = np.where(mask, rng.integers(0, vocab, (batch, length)), 0).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


@jax.jit
def forward(graphdef, state, ids, mask):
    """Logits with positions counted over real tokens, as every caller computes them."""
    return model.apply(graphdef, state, ids, model.positions_from_mask(mask), mask)
