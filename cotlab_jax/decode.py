"""Decoding with a static-shape key/value cache: the loop (`decode_loop`, shared by greedy
decoding, sampling and on-policy distillation, each with its own choice of token) and greedy
decoding as one jitted function.

The whole left-padded prompt batch is prefilled in one forward pass that writes its keys and
values into cache slots 0..P-1; then a `lax.while_loop` feeds one token at a time, writing slot
P + i - 1 for the i-th generated token. Rotary positions of new tokens continue from each row's
count of real prompt tokens, exactly as Hugging Face `generate` does for left-padded batches.
A row is finished once it emits `eos_id`: its later tokens are `pad_id`, its later logits are
zeros, and the loop stops early when every row has finished.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from cotlab_jax.model import MemberSizes, positions_from_mask

# Picks each row's token from its logits [B, V] at decode step `step` (0: the first generated
# token): int [B]. Greedy decoding takes the argmax; sampling and on-policy distillation draw.
TokenChoice = Callable[[jax.Array, jax.Array], jax.Array]


def decode_loop(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
    choose: TokenChoice,
    eos_id: int | jax.Array | None = None,
    pad_id: int | jax.Array = 0,
    keep_logits: bool = False,
    sizes: MemberSizes | None = None,
):
    """The KV-cache decoding loop of greedy decoding (`greedy_decode`), sampling
    (`sampling.sample_decode`) and on-policy distillation (`distill.sample_continuations`):
    prefill, then one token at a time, each row's token picked by `choose(logits, step)`.
    Traceable; the callers jit it.

    Returns tokens [B, T] int32 (`pad_id` after a row's eos), lengths [B] int32 (tokens
    generated, eos included) and, with `keep_logits`, the logits [B, T, V] float32 each token
    was chosen from (zeros after a row's eos; None without). `sizes`: None, or a size-packed
    member's `MemberSizes` (`cotlab_jax.size_packing`).
    """
    model = nnx.merge(graphdef, state)
    # Only a packed member passes sizes: any module with Llama's call signature runs unpacked.
    packed = {} if sizes is None else dict(sizes=sizes)
    batch_size, prompt_length = prompt_ids.shape
    prompt_mask = prompt_mask.astype(bool)
    # The last generated token is never fed back, so it needs no cache slot.
    cache_length = prompt_length + max_new_tokens - 1
    key_mask = jnp.zeros((batch_size, cache_length), bool).at[:, :prompt_length].set(prompt_mask)
    prompt_logits, cache = model(
        prompt_ids,
        positions_from_mask(prompt_mask),
        key_mask,
        model.init_cache(batch_size, cache_length),
        0,
        **packed,
    )
    step_logits = prompt_logits[:, -1]
    token = choose(step_logits, jnp.int32(0)).astype(jnp.int32)

    tokens = jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    logits = None
    if keep_logits:
        logits = jnp.zeros((batch_size, max_new_tokens, step_logits.shape[-1]), jnp.float32)
        logits = logits.at[:, 0].set(step_logits)
    lengths = jnp.ones((batch_size,), jnp.int32)
    done = _is_eos(token, eos_id)
    # The first generated token's rotary position: right after the real prompt tokens.
    first_new_position = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)

    def unfinished(carry):
        step, _, _, _, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def generate_one(carry):
        step, token, cache, key_mask, tokens, logits, lengths, done = carry
        slot = prompt_length + step - 1  # where the previous token's keys and values go
        key_mask = jax.lax.dynamic_update_slice_in_dim(
            key_mask, jnp.ones((batch_size, 1), bool), slot, axis=1
        )
        step_logits, cache = model(
            token[:, None],
            (first_new_position + step - 1)[:, None],
            key_mask,
            cache,
            slot,
            **packed,
        )
        step_logits = jnp.where(done[:, None], 0.0, step_logits[:, 0])
        token = jnp.where(done, pad_id, choose(step_logits, step)).astype(jnp.int32)
        tokens = tokens.at[:, step].set(token)
        if keep_logits:
            logits = logits.at[:, step].set(step_logits)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | _is_eos(token, eos_id)
        return step + 1, token, cache, key_mask, tokens, logits, lengths, done

    carry = (jnp.int32(1), token, cache, key_mask, tokens, logits, lengths, done)
    _, _, _, _, tokens, logits, lengths, _ = jax.lax.while_loop(unfinished, generate_one, carry)
    return tokens, lengths, logits


def greedy_argmax(logits: jax.Array, step: jax.Array) -> jax.Array:
    del step
    return jnp.argmax(logits, axis=-1)


@functools.partial(jax.jit, static_argnames="max_new_tokens")
def greedy_decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
    eos_id: int | jax.Array | None = None,
    pad_id: int | jax.Array = 0,
    sizes: MemberSizes | None = None,
):
    """Greedily generates up to `max_new_tokens` tokens after each left-padded prompt.

    Args:
      graphdef, state: the model, as from `cotlab_jax.model.init`.
      prompt_ids: [B, P] int token ids, left-padded; every row needs at least one real token.
      prompt_mask: [B, P], True/1 for real prompt tokens.
      max_new_tokens: T, the static number of decoding steps.
      eos_id: the token that ends a row, or None to always generate T tokens.
      pad_id: the token that fills a row after its eos.
      sizes: None, or a size-packed member's `MemberSizes` (`cotlab_jax.size_packing`).

    Returns:
      tokens: [B, T] int32, the generated tokens, `pad_id` after a row's eos.
      logits: [B, T, V] float32, the logits each token was chosen from (zeros after eos).
      lengths: [B] int32, the number of tokens generated per row, its eos included.
    """
    tokens, lengths, logits = decode_loop(
        graphdef,
        state,
        prompt_ids,
        prompt_mask,
        max_new_tokens,
        greedy_argmax,
        eos_id,
        pad_id,
        keep_logits=True,
        sizes=sizes,
    )
    return tokens, logits, lengths


def _is_eos(token: jax.Array, eos_id: jax.Array | None) -> jax.Array:
    if eos_id is None:
        return jnp.zeros(token.shape, bool)
    return token == eos_id
