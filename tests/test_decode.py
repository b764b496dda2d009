"""KV-cache greedy decoding equals decoding by repeated full forward passes."""

import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import forward, random_batch, random_state, tiny_config

from cotlab_jax import decode


def decode_by_full_forward(graphdef, state, ids, mask, new_tokens, eos_id, pad_id):
    """The obvious decoder: re-run the whole sequence for every token, no cache."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    batch = ids.shape[0]
    tokens = np.full((batch, new_tokens), pad_id)
    logits = np.zeros((batch, new_tokens, 0), np.float32)
    lengths = np.zeros(batch, int)
    done = np.zeros(batch, bool)
    for step in range(new_tokens):
        step_logits = np.asarray(forward(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)))[
            :, -1
        ]
        if logits.shape[-1] == 0:
            logits = np.zeros((batch, new_tokens, step_logits.shape[-1]), np.float32)
        token = np.argmax(step_logits, axis=-1)
        for row in np.flatnonzero(~done):
            tokens[row, step] = token[row]
            logits[row, step] = step_logits[row]
            lengths[row] += 1
            done[row] = token[row] == eos_id
        ids = np.concatenate([ids, token[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((batch, 1), bool)], axis=1)
    return tokens, logits, lengths


@pytest.fixture(scope="module")
def model_and_prompts():
    config = tiny_config(vocab_size=48, initializer_range=0.3)
    graphdef, state = random_state(config, 21)
    ids, mask = random_batch(21, 4, 9, config.vocab_size, pads=(0, 1, 4, 8))
    return config, graphdef, state, ids, mask


def test_cache_decode_equals_full_forward_decode(model_and_prompts):
    config, graphdef, state, ids, mask = model_and_prompts
    new_tokens, pad_id = 6, config.vocab_size - 1
    free_run = tuple(map(np.asarray, decode.greedy_decode(graphdef, state, ids, mask, new_tokens)))
    for got, want in zip(
        free_run,
        decode_by_full_forward(graphdef, state, ids, mask, new_tokens, None, 0),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(free_run[2], [new_tokens] * 4)

    eos_id = int(free_run[0][2, 1])  # row 2 stops after at most two tokens
    got = decode.greedy_decode(graphdef, state, ids, mask, new_tokens, eos_id=eos_id, pad_id=pad_id)
    tokens, logits, lengths = map(np.asarray, got)
    want_tokens, want_logits, want_lengths = decode_by_full_forward(
        graphdef, state, ids, mask, new_tokens, eos_id, pad_id
    )
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(lengths, want_lengths)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)
    assert lengths[2] <= 2 and lengths.max() == new_tokens
    assert len(set(tokens[tokens != pad_id].tolist())) > 3  # not a degenerate repeat
    assert tokens.dtype == np.int32 and logits.dtype == np.float32 and lengths.dtype == np.int32


def test_one_new_token_is_the_prompts_next_token(model_and_prompts):
    _, graphdef, state, ids, mask = model_and_prompts
    tokens, logits, lengths = decode.greedy_decode(graphdef, state, ids, mask, 1, eos_id=0)
    prompt_logits = np.asarray(forward(graphdef, state, ids, mask))[:, -1]
    np.testing.assert_allclose(logits[:, 0], prompt_logits, atol=1e-5)
    np.testing.assert_array_equal(tokens[:, 0], prompt_logits.argmax(-1))
    np.testing.assert_array_equal(lengths, [1, 1, 1, 1])


def test_rows_finished_at_once_stop_the_loop(model_and_prompts):
    """If every row emits eos first, the rest is padding and zero logits."""
    _, graphdef, state, ids, mask = model_and_prompts
    same_ids, same_mask = jnp.repeat(ids[:1], 4, axis=0), jnp.repeat(mask[:1], 4, axis=0)
    first = np.asarray(forward(graphdef, state, same_ids, same_mask))[0, -1].argmax()
    tokens, logits, lengths = decode.greedy_decode(
        graphdef, state, same_ids, same_mask, 6, eos_id=int(first), pad_id=7
    )
    np.testing.assert_array_equal(tokens, [[first, 7, 7, 7, 7, 7]] * 4)
    np.testing.assert_array_equal(lengths, [1] * 4)
    assert np.all(np.asarray(logits)[:, 1:] == 0) and np.all(np.asarray(logits)[:, 0] != 0)


def test_bfloat16_decoding_mostly_agrees_with_float32(model_and_prompts):
    config, _, state, ids, mask = model_and_prompts
    graphdef16, _ = random_state(tiny_config(vocab_size=48, dtype="bfloat16"), 0)
    tokens32, _, _ = decode.greedy_decode(*model_and_prompts[1:], 6)
    tokens16, logits16, _ = decode.greedy_decode(graphdef16, state, ids, mask, 6)
    assert logits16.dtype == jnp.float32
    # Greedy paths may part ways after a near-tie, but the first tokens mostly agree.
    assert np.mean(np.asarray(tokens16)[:, 0] == np.asarray(tokens32)[:, 0]) >= 0.75
