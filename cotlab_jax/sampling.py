"""Temperature / top-p sampling with a static-shape key/value cache, and the majority vote.

`sample_decode` is `decode.greedy_decode` with the argmax replaced by a draw: the same loop
(`decode.decode_loop`: the prefill of the left-padded prompts, the `lax.while_loop` over decode
steps, the eos handling, `pad_id` after a row's eos, stop once every row has finished).
`sample_many` runs it for S samples per prompt as one vmapped program.

Draws are reproducible: row b's token at decode step i is
`jax.random.categorical(step_key(keys[b], i), filtered_logits(logits, temperature, top_p))`, so
a row's samples depend only on its own key, never on the batch it was decoded in. Temperature 0 is
greedy decoding (argmax, as vLLM and Hugging Face treat it); `temperature` and `top_p` are traced,
so changing them does not recompile.

`majority_vote` picks, per prompt, the most frequent of S extracted answers as the reference's
vLLM evaluator does with `collections.Counter(pred_ids).most_common(1)[0][0]`: invalid outputs
carry one sentinel value that is itself a candidate (it can win the vote), and a tie goes to the
value whose first occurrence comes first in sample order (`most_common` sorts stably by count,
`Counter` keeps first-insertion order).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cotlab_jax import decode


def step_key(row_key: jax.Array, step: jax.Array | int) -> jax.Array:
    """The key of one row's draw at decode step `step` (0 = the first generated token)."""
    return jax.random.fold_in(row_key, step)


def filtered_logits(
    logits: jax.Array, temperature: jax.Array | float, top_p: jax.Array | float
) -> jax.Array:
    """`logits / temperature` [..., V] with every token outside the top-p nucleus at -inf.

    The nucleus is the smallest set of most probable tokens whose probability (after the
    temperature) reaches `top_p`; the most probable token is always in it. Equal logits at the
    nucleus' edge are ordered by token id (a stable sort), as a sort-based top-p does.
    `temperature` must be > 0 here (0 is greedy: see `choose_tokens`).
    """
    scaled = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-scaled, axis=-1, stable=True)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
    # A token is kept iff the probability of the tokens before it is still below top_p.
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, scaled, -jnp.inf)


def choose_tokens(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array | float, top_p: jax.Array | float
) -> jax.Array:
    """int32 [B]: one draw per row from `logits` [B, V] with `keys` [B]; argmax at temperature 0."""
    greedy = jnp.argmax(logits, axis=-1)
    safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered_logits(logits, safe_temperature, top_p))
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="max_new_tokens")
def sample_decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
    eos_id: int | jax.Array,
    pad_id: int | jax.Array,
    keys: jax.Array,
    temperature: jax.Array | float,
    top_p: jax.Array | float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Samples up to `max_new_tokens` tokens after each left-padded prompt [B, P].

    `keys` [B] are the rows' keys (see `step_key`); `eos_id` ends a row (None: never). Returns
    tokens int32 [B, T] (`pad_id` after a row's eos) and lengths int32 [B] (eos included).
    """

    def draw(step_logits, step):
        return choose_tokens(
            step_logits, jax.vmap(step_key, (0, None))(keys, step), temperature, top_p
        )

    tokens, lengths, _ = decode.decode_loop(
        graphdef, state, prompt_ids, prompt_mask, max_new_tokens, draw, eos_id, pad_id
    )
    return tokens, lengths


def sample_many(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
    eos_id: int | jax.Array,
    pad_id: int | jax.Array,
    keys: jax.Array,
    temperature: jax.Array | float,
    top_p: jax.Array | float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """`sample_decode` for S samples of every prompt: `keys` [S, B] (sample s of row b draws from
    `keys[s, b]`), tokens int32 [S, B, T] and lengths int32 [S, B], vmapped over the samples."""

    def one_sample(sample_keys):
        return sample_decode(
            graphdef,
            state,
            prompt_ids,
            prompt_mask,
            max_new_tokens,
            eos_id,
            pad_id,
            sample_keys,
            temperature,
            top_p,
        )

    return jax.vmap(one_sample)(keys)


def majority_vote(answers: jax.Array) -> jax.Array:
    """[B]: the most frequent of each column's S answers `answers` [S, B]; a tie goes to the value
    that occurs first (lowest sample index). Invalid outputs should share one sentinel value: they
    then vote like any answer, as in the reference."""
    counts = (answers[:, None, :] == answers[None, :, :]).sum(axis=1)  # [S, B]
    # argmax takes the first maximal sample: the first occurrence of the earliest tied value.
    winner = jnp.argmax(counts, axis=0)
    return jnp.take_along_axis(answers, winner[None, :], axis=0)[0]
