"""Temperature / top-p sampling with a static-shape key/value cache, and the majority vote.

`sample_decode` is `decode.greedy_decode` with the argmax replaced by a draw: the same prefill of
the left-padded prompts, the same `lax.while_loop` over decode steps, the same eos handling
(`pad_id` after a row's eos, stop once every row has finished). `sample_many` runs it for S samples
per prompt as one vmapped program.

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

from cotlab_jax.model import positions_from_mask


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
    model = nnx.merge(graphdef, state)
    batch_size, prompt_length = prompt_ids.shape
    prompt_mask = prompt_mask.astype(bool)
    cache_length = prompt_length + max_new_tokens - 1  # the last token is never fed back
    key_mask = jnp.zeros((batch_size, cache_length), bool).at[:, :prompt_length].set(prompt_mask)
    prompt_logits, cache = model(
        prompt_ids,
        positions_from_mask(prompt_mask),
        key_mask,
        model.init_cache(batch_size, cache_length),
        0,
    )

    def draw(step_logits, step):
        return choose_tokens(
            step_logits, jax.vmap(step_key, (0, None))(keys, step), temperature, top_p
        )

    token = draw(prompt_logits[:, -1], 0)
    tokens = jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    lengths = jnp.ones((batch_size,), jnp.int32)
    done = _is_eos(token, eos_id)
    first_new_position = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)

    def unfinished(carry):
        step, _, _, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def generate_one(carry):
        step, token, cache, key_mask, tokens, lengths, done = carry
        slot = prompt_length + step - 1  # where the previous token's keys and values go
        key_mask = jax.lax.dynamic_update_slice_in_dim(
            key_mask, jnp.ones((batch_size, 1), bool), slot, axis=1
        )
        step_logits, cache = model(
            token[:, None], (first_new_position + step - 1)[:, None], key_mask, cache, slot
        )
        token = jnp.where(done, pad_id, draw(step_logits[:, 0], step)).astype(jnp.int32)
        tokens = tokens.at[:, step].set(token)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | _is_eos(token, eos_id)
        return step + 1, token, cache, key_mask, tokens, lengths, done

    carry = (1, token, cache, key_mask, tokens, lengths, done)
    _, _, _, _, tokens, lengths, _ = jax.lax.while_loop(unfinished, generate_one, carry)
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


def _is_eos(token: jax.Array, eos_id: jax.Array | None) -> jax.Array:
    if eos_id is None:
        return jnp.zeros(token.shape, bool)
    return token == eos_id
