"""Same weights, same numbers as Hugging Face `LlamaForCausalLM` (float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_helpers import forward, random_batch, random_state, tiny_config

from cotlab_jax import decode, hf_convert, model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_model(config: model.LlamaConfig, seed: int, **hf_overrides):
    """A randomly initialised HF model described by our config (tests `to_hf_config`)."""
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(
        **dict(hf_convert.to_hf_config(config), attn_implementation="eager", **hf_overrides)
    )
    return transformers.LlamaForCausalLM(hf_config).eval()


def converted(hf, config: model.LlamaConfig):
    """Our (graphdef, state) holding the HF model's weights (tests `from_hf_state_dict`)."""
    state_dict = {name: tensor.numpy() for name, tensor in hf.state_dict().items()}
    graphdef, _ = random_state(config, 0)
    return graphdef, hf_convert.from_hf_state_dict(state_dict, config)


def hf_logits(hf, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return hf(
            input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
            attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
            position_ids=torch.from_numpy(np.asarray(model.positions_from_mask(mask), np.int64)),
        ).logits.numpy()


REFERENCE_ROPE = model.Llama3RopeScaling()  # docs/tasks.md section 5: factor 1, low 1, high 4, 1000


@pytest.mark.parametrize(
    "heads, kv_heads, tied, rope_scaling",
    [
        (4, 4, True, None),  # GQA ratio 1 (multi-head), default rope
        (4, 4, False, model.Llama3RopeScaling(8.0, 1.0, 4.0, 16)),
        (8, 2, True, model.Llama3RopeScaling(8.0, 1.0, 4.0, 16)),  # GQA ratio 4
        (8, 2, False, REFERENCE_ROPE),
    ],
)
def test_logits_match_hf_with_left_padding(heads, kv_heads, tied, rope_scaling):
    config = tiny_config(
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_size=64,
        head_dim=8,
        tie_word_embeddings=tied,
        rope_scaling=rope_scaling,
    )
    hf = hf_model(config, seed=heads + kv_heads + tied)
    graphdef, state = converted(hf, config)
    ids, mask = random_batch(5, 4, 24, config.vocab_size, pads=(0, 5, 11, 23))
    ours = np.asarray(forward(graphdef, state, ids, mask))
    theirs = hf_logits(hf, ids, mask)
    real = np.asarray(mask)
    assert np.abs(theirs[real]).max() > 1.0  # logits of a size that makes the check meaningful
    assert np.abs(ours[real] - theirs[real]).max() < 1e-4


def test_llama3_scaling_changes_the_frequencies_like_hf():
    """The non-trivial llama3 setting really rescales (so the parity tests exercise it)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling in (model.Llama3RopeScaling(8.0, 1.0, 4.0, 16), REFERENCE_ROPE):
        config = tiny_config(head_dim=16, hidden_size=64, rope_theta=10000.0, rope_scaling=scaling)
        hf_config = transformers.LlamaConfig(**hf_convert.to_hf_config(config))
        theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
        ours = model.rope_inverse_frequencies(config)
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    unscaled = model.rope_inverse_frequencies(
        tiny_config(head_dim=16, hidden_size=64, rope_scaling=None)
    )
    scaled = model.rope_inverse_frequencies(tiny_config(head_dim=16, hidden_size=64))
    assert np.sum(~np.isclose(scaled, unscaled)) >= 2


def test_round_trip_ours_to_hf_to_ours():
    config = tiny_config(tie_word_embeddings=False)
    graphdef, state = random_state(config, 7)
    state_dict = hf_convert.to_hf_state_dict(state, config)
    hf = hf_model(config, seed=0)
    assert set(state_dict) == set(hf.state_dict())
    hf.load_state_dict({name: torch.from_numpy(array) for name, array in state_dict.items()})
    back = hf_convert.from_hf_state_dict(
        {name: tensor.numpy() for name, tensor in hf.state_dict().items()}, config
    )
    for ours, returned in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(ours, returned)
    ids, mask = random_batch(8, 3, 16, config.vocab_size)
    real = np.asarray(mask)
    np.testing.assert_allclose(
        hf_logits(hf, ids, mask)[real],
        np.asarray(forward(graphdef, state, ids, mask))[real],
        atol=1e-4,
    )


def test_tied_state_dict_matches_hf_keys():
    config = tiny_config(tie_word_embeddings=True)
    _, state = random_state(config, 9)
    state_dict = hf_convert.to_hf_state_dict(state, config)
    assert set(state_dict) == set(hf_model(config, seed=0).state_dict())
    np.testing.assert_array_equal(
        state_dict["lm_head.weight"], state_dict["model.embed_tokens.weight"]
    )


def test_config_round_trip_through_hf():
    for config in (
        tiny_config(),
        tiny_config(rope_scaling=None, tie_word_embeddings=False),
        model.LlamaConfig(vocab_size=1024),
    ):
        hf_config = transformers.LlamaConfig(**hf_convert.to_hf_config(config))
        back = hf_convert.from_hf_config(hf_config.to_dict(), dtype=config.dtype)
        assert back == config


def test_from_hf_config_reads_legacy_rope_fields():
    legacy = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    )
    config = hf_convert.from_hf_config(legacy)
    assert config.rope_theta == 500000.0 and config.head_dim == 8
    assert config.rope_scaling == model.Llama3RopeScaling(8.0, 1.0, 4.0, 16)
    assert not config.tie_word_embeddings  # HF's default
    with pytest.raises(ValueError, match="hidden_act"):
        hf_convert.from_hf_config(dict(legacy, hidden_act="gelu"))


def test_from_hf_state_dict_names_bad_tensors():
    config = tiny_config()
    _, state = random_state(config, 0)
    state_dict = hf_convert.to_hf_state_dict(state, config)
    missing = dict(state_dict)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_convert.from_hf_state_dict(missing, config)
    wrong = dict(state_dict, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32))})
    with pytest.raises(ValueError, match=r"k_proj.*\(8, 32\)"):
        hf_convert.from_hf_state_dict(wrong, config)
    extra = dict(state_dict, **{"model.layers.2.mlp.up_proj.weight": np.zeros((64, 32))})
    with pytest.raises(ValueError, match=r"model\.layers\.2"):
        hf_convert.from_hf_state_dict(extra, config)


def test_greedy_decoding_matches_hf_generate():
    config = tiny_config(num_hidden_layers=3, vocab_size=48, initializer_range=0.3)
    hf = hf_model(config, seed=3)
    graphdef, state = converted(hf, config)
    ids, mask = random_batch(11, 4, 10, config.vocab_size, pads=(0, 2, 6, 9))
    new_tokens, pad_id = 8, config.vocab_size - 1
    free_run, _, _ = decode.greedy_decode(graphdef, state, ids, mask, new_tokens)
    eos_id = int(free_run[1, 2])  # so that at least one row stops early

    tokens, logits, lengths = decode.greedy_decode(
        graphdef, state, ids, mask, new_tokens, eos_id=eos_id, pad_id=pad_id
    )
    with torch.no_grad():
        generated = hf.generate(
            torch.from_numpy(np.asarray(ids, np.int64)),
            attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
    hf_tokens = generated.sequences[:, ids.shape[1] :].numpy()
    steps = hf_tokens.shape[1]  # HF stops once every row has finished
    tokens, logits, lengths = map(np.asarray, (tokens, logits, lengths))
    np.testing.assert_array_equal(tokens[:, :steps], hf_tokens)
    assert np.all(tokens[:, steps:] == pad_id)
    assert lengths[1] <= 3 and lengths.max() > lengths.min()
    hf_step_logits = np.stack([step.numpy() for step in generated.logits], axis=1)
    for row, length in enumerate(lengths):
        assert length == (
            list(hf_tokens[row]).index(eos_id) + 1 if eos_id in hf_tokens[row] else new_tokens
        )
        np.testing.assert_allclose(logits[row, :length], hf_step_logits[row, :length], atol=1e-4)
        top2 = np.sort(hf_step_logits[row, :length], axis=-1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > 1e-3)  # no near-ties: the match is not luck


@pytest.mark.parametrize("padding_idx", [None, 47])
def test_loss_and_gradients_match_hf(padding_idx):
    """One training step's loss and every parameter's gradient, as torch autograd gives them,
    including the reference's `padding_idx=V-1` embedding (tied: the row gets only the output
    head's gradient) with the pad id among the real tokens."""
    config = tiny_config(vocab_size=48, padding_idx=padding_idx, tie_word_embeddings=True)
    hf = hf_model(config, seed=13)  # to_hf_config carries padding_idx as pad_token_id
    graphdef, state = converted(hf, config)
    ids, mask = random_batch(13, 4, 20, config.vocab_size, pads=(0, 3, 9, 0))
    ids = jnp.where(mask & (jnp.arange(20) % 4 == 1)[None, :], config.vocab_size - 1, ids)
    # Real tokens predicting real tokens: a padding query attends to nothing, and how a fully
    # masked row is filled (and differentiated) is each implementation's own choice.
    weights = np.asarray(mask[:, 1:] & mask[:, :-1], np.float32)

    def loss_fn(state):
        logits = model.apply(graphdef, state, ids, model.positions_from_mask(mask), mask)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        return jnp.sum(losses * weights) / jnp.sum(weights)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state)

    hf.zero_grad()
    hf_out = hf(
        input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
        attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
        position_ids=torch.from_numpy(np.asarray(model.positions_from_mask(mask), np.int64)),
    ).logits
    hf_losses = torch.nn.functional.cross_entropy(
        hf_out[:, :-1].reshape(-1, config.vocab_size),
        torch.from_numpy(np.asarray(ids[:, 1:], np.int64)).reshape(-1),
        reduction="none",
    )
    hf_weights = torch.from_numpy(weights.reshape(-1))
    hf_loss = (hf_losses * hf_weights).sum() / hf_weights.sum()
    hf_loss.backward()
    hf_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    hf_grads = hf_convert.from_hf_state_dict(hf_grads, config)

    np.testing.assert_allclose(float(loss), hf_loss.item(), rtol=1e-6)
    # Float32 sums in other orders: differences of ~1e-6 of the largest gradient entry.
    for ours, theirs in zip(jax.tree.leaves(grads), jax.tree.leaves(hf_grads), strict=True):
        scale = np.abs(np.asarray(theirs)).max()
        assert scale > 0
        np.testing.assert_allclose(ours, theirs, atol=1e-5 * scale)
    embed_grad = np.asarray(grads["embed_tokens"][...])
    pad_row = config.vocab_size - 1
    if padding_idx is not None:  # HF's row gets only the head's share; ours the same
        assert np.abs(embed_grad[pad_row]).max() > 0
