"""The training loss (and the evaluation's per-token cross-entropy): HF `LlamaForCausalLM`'s
next-token cross-entropy, in float32, with labels of -100 (`data.IGNORE_INDEX`) ignored."""

import jax
import jax.numpy as jnp

from cotlab_jax.data import IGNORE_INDEX


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of logits [..., V] against labels [...], in float32, and the label mask.

    Positions labelled -100 get 0 and False.
    """
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE_INDEX
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0), valid


def teacher_forced_loss(
    logits: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """HF `LlamaForCausalLM`'s loss: logits at t-1 against the label at t, -100 ignored.

    Args:
      logits: [B, L, V] (upcast to float32, as HF does).
      labels: [B, L] int, aligned with the inputs.
    Returns:
      loss: the mean over every labelled token of the batch (0, not HF's NaN, if there is none).
      sums: float32 [B], each sequence's summed cross-entropy.
      counts: int32 [B], each sequence's number of labelled tokens (its first label never counts).
    `sums.sum() / counts.sum()` over several batches is the mean over all of them.
    """
    # Shifting the labels left (as HF does) instead of slicing the logits copies no [B, L, V].
    shifted = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    ce, valid = token_cross_entropy(logits, shifted)
    sums, counts = ce.sum(-1), valid.sum(-1, dtype=jnp.int32)
    return sums.sum() / jnp.maximum(counts.sum(), 1), sums, counts
