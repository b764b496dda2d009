"""The decoder itself: configuration, parameters, padding, precision, remat, layer scan, FLOPs."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from model_helpers import forward, random_batch, random_state, tiny_config

from cotlab_jax import decode, model
from cotlab_jax.config import ConfigError, model_config

# --- configuration -----------------------------------------------------------------------------


def test_from_config_gives_the_reference_model():
    config = model.LlamaConfig.from_config(model_config(), vocab_size=1024)
    assert config == model.LlamaConfig(vocab_size=1024)
    sizes = (config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    assert sizes == (4, 2048, 8192)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 64)
    assert config.rope_scaling == model.Llama3RopeScaling(1.0, 1.0, 4.0, 1000)
    assert config.tie_word_embeddings and config.dtype == "float32"


def test_from_config_reads_default_rope_and_derives_head_dim():
    cfg = model_config()
    cfg.rope_scaling = None
    cfg.head_dim = None
    config = model.LlamaConfig.from_config(cfg, vocab_size=64)
    assert config.rope_scaling is None and config.head_dim == 2048 // 32
    cfg.rope_scaling = {"rope_type": "default"}
    assert model.LlamaConfig.from_config(cfg, vocab_size=64).rope_scaling is None


@pytest.mark.parametrize(
    "overrides, field, value",
    [
        (dict(hidden_size=30, head_dim=None), "model.hidden_size", 30),
        (dict(num_attention_heads=4, num_key_value_heads=3), "model.num_key_value_heads", 3),
        (dict(num_hidden_layers=0), "model.num_hidden_layers", 0),
        (dict(intermediate_size=-8), "model.intermediate_size", -8),
        (dict(vocab_size=0), "data.vocab_size", 0),
        (dict(head_dim=7), "model.head_dim", 7),
        (dict(rms_norm_eps=0.0), "model.rms_norm_eps", 0.0),
        (dict(rope_theta=-1.0), "model.rope_theta", -1.0),
        (dict(dtype="float16"), "model.dtype", "float16"),
        (dict(remat_policy="save_only_these_names"), "model.remat_policy", "save_only_these_names"),
        (dict(attention_impl="flash"), "model.attention_impl", "flash"),
        (dict(tie_word_embeddings=1), "model.tie_word_embeddings", 1),
    ],
)
def test_invalid_config_names_field_value_and_allowed(overrides, field, value):
    with pytest.raises(ConfigError, match=r"is invalid: (expected|with head_dim=None)") as error:
        tiny_config(**overrides)
    assert str(error.value).startswith(f"config.{field}={value!r} is invalid: ")


@pytest.mark.parametrize(
    "rope_scaling, field",
    [
        ({"rope_type": "yarn", "factor": 2.0}, "model.rope_scaling.rope_type"),
        ({"rope_type": "llama3", "factor": 0.0}, "model.rope_scaling.factor"),
        (
            {"rope_type": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 4.0},
            "model.rope_scaling.high_freq_factor",
        ),
        (
            {"rope_type": "llama3", "original_max_position_embeddings": 1.5},
            "model.rope_scaling.original_max_position_embeddings",
        ),
        ({"rope_type": "llama3", "beta_fast": 32}, "model.rope_scaling"),
    ],
)
def test_invalid_rope_scaling(rope_scaling, field):
    cfg = model_config()
    cfg.rope_scaling = rope_scaling
    with pytest.raises(ConfigError, match=f"^config.{field}="):
        model.LlamaConfig.from_config(cfg, vocab_size=64)


def test_unknown_model_field_is_rejected():
    cfg = model_config().to_dict()
    cfg["n_layers"] = 3
    with pytest.raises(ConfigError, match="n_layers"):
        model.LlamaConfig.from_config(cfg, vocab_size=64)


def test_cudnn_attention_on_cpu_is_a_config_error():
    config = tiny_config(attention_impl="cudnn", dtype="bfloat16")
    graphdef, state = random_state(config, 0)
    ids, mask = random_batch(0, 2, 8, config.vocab_size)
    with pytest.raises(ConfigError, match="model.attention_impl"):
        forward(graphdef, state, ids, mask)


# --- parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth, millions", [(4, 245), (8, 489), (12, 732)])
def test_reference_parameter_counts(depth, millions):
    config = model.LlamaConfig(vocab_size=1024, num_hidden_layers=depth)
    _, state = jax.eval_shape(functools.partial(model.init, config), jax.random.key(0))
    assert round(model.count_params(state) / 1e6) == millions


@pytest.mark.parametrize("tied", [True, False])
def test_parameters_are_float32_stacked_and_annotated(tied):
    config = tiny_config(tie_word_embeddings=tied, dtype="bfloat16")
    _, state = model.init(config, jax.random.key(0))
    allowed = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers"}
    flat = dict(nnx.to_flat_state(state))
    assert (("lm_head",) in flat) == (not tied)
    for path, variable in flat.items():
        names = variable.get_metadata()["out_sharding"]
        assert variable.get_value().dtype == jnp.float32, path
        assert len(names) == variable.get_value().ndim and set(names) <= allowed, (path, names)
        if path[0] == "layers":
            assert (
                names[0] == "layers" and variable.get_value().shape[0] == config.num_hidden_layers
            )
    q = flat[("layers", "self_attn", "q_proj")].get_value()
    assert q.shape == (2, 32, 4, 8)
    # Initialised like HF: normal(0, initializer_range) matrices, unit norm scales.
    assert abs(float(jnp.std(q)) - config.initializer_range) < 0.02
    assert np.all(np.asarray(flat[("norm", "scale")].get_value()) == 1.0)


# --- forward -------------------------------------------------------------------------------------


def test_left_padding_does_not_change_real_logits():
    config = tiny_config()
    graphdef, state = random_state(config, 1)
    ids, _ = random_batch(1, 1, 10, config.vocab_size, pads=(0,))
    padded = jnp.concatenate([jnp.full((1, 5), 3, jnp.int32), ids], axis=1)
    padded_mask = jnp.arange(15)[None, :] >= 5
    plain = forward(graphdef, state, ids, jnp.ones((1, 10), bool))
    with_pads = forward(graphdef, state, padded, padded_mask)
    np.testing.assert_allclose(with_pads[:, 5:], plain, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(with_pads)))


def test_logits_are_causal():
    config = tiny_config()
    graphdef, state = random_state(config, 2)
    ids, mask = random_batch(2, 2, 12, config.vocab_size, pads=(0,))
    changed = ids.at[:, 8].set((ids[:, 8] + 1) % config.vocab_size)
    before, after = forward(graphdef, state, ids, mask), forward(graphdef, state, changed, mask)
    np.testing.assert_array_equal(before[:, :8], after[:, :8])
    assert np.abs(np.asarray(before[:, 8:] - after[:, 8:])).max() > 1e-3


def test_bfloat16_compute_is_within_bfloat16_tolerance_of_float32():
    config32 = tiny_config()
    graphdef32, state = random_state(config32, 3)
    graphdef16, _ = random_state(tiny_config(dtype="bfloat16"), 3)
    ids, mask = random_batch(3, 3, 16, config32.vocab_size)
    logits32 = np.asarray(forward(graphdef32, state, ids, mask))[np.asarray(mask)]
    logits16 = forward(graphdef16, state, ids, mask)
    assert logits16.dtype == jnp.float32
    logits16 = np.asarray(logits16)[np.asarray(mask)]
    error = np.abs(logits16 - logits32)
    # bfloat16 keeps 8 significant bits (relative rounding 2^-8 ~ 0.4%); through two layers of
    # matmuls, norms and a softmax the logits drift by a few percent at most, and not at all
    # by the O(1) a wrong cast or a float32-only code path would give.
    assert 0 < error.max() < 0.05 * np.abs(logits32).max()
    assert error.mean() < 0.03 * np.abs(logits32).mean()


def _loss(graphdef, state, ids, mask):
    logits = model.apply(graphdef, state, ids, model.positions_from_mask(mask), mask)
    targets = jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - targets)


def _saved_layer_residuals(graphdef, state, ids, mask, capsys) -> int:
    """How many arrays the backward pass keeps from the layer scan."""
    capsys.readouterr()
    print_saved_residuals(lambda state: _loss(graphdef, state, ids, mask), state)
    return sum("output of scan" in line for line in capsys.readouterr().out.splitlines())


def test_remat_keeps_loss_and_gradients_and_saves_less(capsys):
    config = tiny_config()
    graphdef, state = random_state(config, 4)
    ids, mask = random_batch(4, 2, 12, config.vocab_size)
    grad_fn = jax.jit(jax.value_and_grad(_loss, argnums=1))
    value, grads = grad_fn(graphdef, state, ids, mask)
    full_graphdef, _ = random_state(tiny_config(remat_policy="full"), 4)
    full_value, full_grads = grad_fn(full_graphdef, state, ids, mask)
    np.testing.assert_allclose(full_value, value, rtol=1e-6)
    for g, full_g in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads), strict=True):
        assert np.abs(np.asarray(g)).max() > 0
        np.testing.assert_allclose(full_g, g, atol=1e-6)

    saved = {}
    for policy in ("none", "full", "dots_with_no_batch_dims_saveable"):
        policy_config = tiny_config(remat_policy=policy, formulation="accelerator")
        policy_graphdef, _ = random_state(policy_config, 4)
        saved[policy] = _saved_layer_residuals(policy_graphdef, state, ids, mask, capsys)
    # "full" keeps only each layer's input; the dots policy also keeps the projections.
    assert saved["full"] < saved["dots_with_no_batch_dims_saveable"] < saved["none"], saved


def test_accelerator_layers_run_in_one_scan():
    """The accelerator program does not grow with depth: one scan over stacked layers."""

    def program(depth):
        config = tiny_config(num_hidden_layers=depth, formulation="accelerator")
        graphdef, state = jax.eval_shape(functools.partial(model.init, config), jax.random.key(0))
        ids = jnp.zeros((2, 8), jnp.int32)
        mask = jnp.ones((2, 8), bool)
        return jax.make_jaxpr(forward.__wrapped__)(graphdef, state, ids, mask)

    shallow, deep = str(program(2)), str(program(8))
    assert shallow.count("scan[") == 1
    assert len(shallow.splitlines()) == len(deep.splitlines())


def test_flops_per_token_matches_compiled_cost():
    # One layer, because XLA's cost analysis counts a loop body once.
    config = tiny_config(
        num_hidden_layers=1, hidden_size=128, intermediate_size=512, head_dim=32, vocab_size=256
    )
    graphdef, state = random_state(config, 0)
    ids = jnp.zeros((4, 64), jnp.int32)
    mask = jnp.ones((4, 64), bool)
    compiled = forward.lower(graphdef, state, ids, mask).compile()
    measured = compiled.cost_analysis()["flops"] / ids.size
    assert measured == pytest.approx(model.flops_per_token(config, 64, training=False), rel=0.05)
    assert model.flops_per_token(config, 64) == 3 * model.flops_per_token(config, 64, False)


# --- formulations, precision, padding_idx --------------------------------------------------------


def test_cpu_formulation_has_the_accelerator_formulations_loss_and_gradients():
    """Unrolled layers and 2-D projections (the CPU formulation) compute the scanned, batched
    program's numbers: the same products summed in another order, so equal to float32 rounding
    (relative 1e-6 per product; loss and gradients ~1e-5 after two layers and the backward)."""
    ids, mask = random_batch(6, 3, 16, 64)
    results = {}
    for formulation in ("cpu", "accelerator"):
        graphdef, state = random_state(tiny_config(formulation=formulation), 6)
        value_and_grad = jax.jit(jax.value_and_grad(_loss, argnums=1))
        results[formulation] = value_and_grad(graphdef, state, ids, mask)
    (cpu_loss, cpu_grads), (acc_loss, acc_grads) = results["cpu"], results["accelerator"]
    np.testing.assert_allclose(cpu_loss, acc_loss, rtol=1e-5)
    for cpu_g, acc_g in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(acc_grads), strict=True):
        scale = np.abs(np.asarray(acc_g)).max()
        assert scale > 0
        np.testing.assert_allclose(cpu_g, acc_g, atol=1e-5 * scale)
    # On a CPU "auto" lowers the CPU branch: the very same program.
    logits = {}
    for formulation in ("cpu", "auto"):
        graphdef, state = random_state(tiny_config(formulation=formulation), 6)
        logits[formulation] = forward(graphdef, state, ids, mask)
    np.testing.assert_array_equal(logits["auto"], logits["cpu"])


@pytest.mark.parametrize("heads, kv_heads, query_length", [(4, 2, 13), (3, 3, 13), (4, 1, 1)])
def test_cpu_attention_is_dot_product_attention(heads, kv_heads, query_length):
    """Outputs and all three input gradients equal jax.nn.dot_product_attention's on random
    inputs with causal and padding masks, fully masked rows included (each path sums in its
    own order: float32 rounding, ~1e-6 of the largest value)."""
    rng = np.random.default_rng(heads + kv_heads + query_length)
    batch, keys, head_dim = 3, 13, 8
    query = jnp.asarray(rng.normal(size=(batch, query_length, heads, head_dim)), jnp.float32)
    key, value = (
        jnp.asarray(rng.normal(size=(batch, keys, kv_heads, head_dim)), jnp.float32)
        for _ in range(2)
    )
    real = np.ones((batch, keys), bool)
    real[1, :4] = False
    real[2, :-2] = False  # most of row 2 is padding: its early queries see no key at all
    query_slots = np.arange(keys - query_length, keys)
    causal = np.arange(keys)[None, :] <= query_slots[:, None]
    mask = jnp.asarray(causal[None, None] & real[:, None, None, :])
    cotangent = jnp.asarray(rng.normal(size=query.shape), jnp.float32)

    def weighted(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v, mask=mask) * cotangent)

    ours = jax.value_and_grad(
        weighted(lambda q, k, v, mask: model.cpu_attention(q, k, v, mask)), argnums=(0, 1, 2)
    )(query, key, value)
    theirs = jax.value_and_grad(weighted(jax.nn.dot_product_attention), argnums=(0, 1, 2))(
        query, key, value
    )
    np.testing.assert_allclose(
        model.cpu_attention(query, key, value, mask),
        jax.nn.dot_product_attention(query, key, value, mask=mask),
        atol=1e-6 * 4,
    )
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
    for mine, reference in zip(ours[1], theirs[1], strict=True):
        scale = np.abs(np.asarray(reference)).max()
        assert scale > 0.1
        np.testing.assert_allclose(mine, reference, atol=2e-6 * scale)


def test_cpu_formulation_decodes_like_the_accelerator_formulation():
    ids, mask = random_batch(7, 3, 10, 64)
    outputs = {}
    for formulation in ("cpu", "accelerator"):
        graphdef, state = random_state(tiny_config(formulation=formulation), 7)
        outputs[formulation] = decode.greedy_decode(graphdef, state, ids, mask, 5)
    np.testing.assert_array_equal(outputs["cpu"][0], outputs["accelerator"][0])
    np.testing.assert_allclose(outputs["cpu"][1], outputs["accelerator"][1], atol=1e-5)


def _dot_precisions(config) -> set:
    graphdef, state = random_state(config, 0)
    ids, mask = random_batch(0, 2, 8, config.vocab_size)
    loss_and_grad = jax.value_and_grad(_loss, argnums=1)
    jaxpr = jax.make_jaxpr(loss_and_grad, static_argnums=0)(graphdef, state, ids, mask)
    precisions = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                precisions.add(eqn.params["precision"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return precisions


@pytest.mark.parametrize(
    "requested, expected",
    [
        ("auto", jax.lax.Precision.HIGHEST),  # float32 compute means true float32 products
        ("default", jax.lax.Precision.DEFAULT),
        ("high", jax.lax.Precision.HIGH),
    ],
)
def test_matmul_precision_reaches_every_product(requested, expected):
    """Every dot of the float32 forward and backward (projections, attention scores and values,
    the output head, in both formulations) carries the configured precision."""
    for formulation in ("cpu", "accelerator"):
        config = tiny_config(matmul_precision=requested, formulation=formulation)
        assert _dot_precisions(config) == {(expected, expected)}


def test_bfloat16_auto_precision_leaves_jax_defaults():
    # No precision of ours; jax's attention picks its own bfloat16 algorithm, as before.
    precisions = _dot_precisions(tiny_config(dtype="bfloat16", formulation="accelerator"))
    assert None in precisions
    assert precisions <= {None, jax.lax.DotAlgorithmPreset.BF16_BF16_F32}


def test_matmul_precision_is_validated():
    with pytest.raises(ConfigError, match=r"config\.model\.matmul_precision='fast'.*highest"):
        tiny_config(matmul_precision="fast")
    with pytest.raises(ConfigError, match=r"config\.model\.formulation='gpu'"):
        tiny_config(formulation="gpu")
    with pytest.raises(ConfigError, match=r"config\.model\.padding_idx=64"):
        tiny_config(padding_idx=64)
    assert model.LlamaConfig.from_config(model_config(), 1024).matmul_precision == "auto"


def test_padding_idx_row_starts_at_zero_and_gets_no_lookup_gradient():
    """As torch's nn.Embedding(padding_idx=V-1): zero at init, no gradient through the lookup,
    and the forward pass unchanged. (Tied, the output head still trains the row: the gradient
    is compared with torch's in test_hf_parity.)"""
    pad = 63
    config = tiny_config(padding_idx=pad, tie_word_embeddings=False, num_hidden_layers=1)
    _, init_state = model.init(config, jax.random.key(3))
    embed = np.asarray(init_state["embed_tokens"][...])
    np.testing.assert_array_equal(embed[pad], 0.0)
    assert np.all(np.abs(embed[:pad]).max(axis=-1) > 0)

    graphdef, state = random_state(config, 3)  # a non-zero pad row, to see its gradient
    plain_graphdef, _ = random_state(tiny_config(tie_word_embeddings=False, num_hidden_layers=1), 3)
    ids, mask = random_batch(3, 3, 16, config.vocab_size, pads=(0,))
    ids = ids.at[:, ::3].set(pad)  # the pad id as real input tokens
    np.testing.assert_array_equal(
        forward(graphdef, state, ids, mask), forward(plain_graphdef, state, ids, mask)
    )
    grad_fn = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
    grads = grad_fn(graphdef, state, ids, mask)["embed_tokens"][...]
    plain = grad_fn(plain_graphdef, state, ids, mask)["embed_tokens"][...]
    assert np.abs(np.asarray(plain[pad])).max() > 1e-3  # the lookup does pass one without it
    np.testing.assert_array_equal(grads[pad], 0.0)
    other = np.arange(config.vocab_size) != pad
    np.testing.assert_allclose(grads[other], plain[other], rtol=1e-6, atol=1e-8)
