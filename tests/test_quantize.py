"""Post-training quantization (`cotlab_jax.quantize`): the stored weights against NumPy
round-to-nearest, the quantized model against the dense model run on those weights, the logits'
error against the rounding step, the bytes, KV-cache decoding and the evaluation."""

import functools

import eval_helpers
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import forward, random_batch, random_state, tiny_config

from cotlab_jax import decode, evaluate, quantize
from cotlab_jax.config import ConfigError

# Hidden 64 with weights of std 1/sqrt(64): every matmul has about unit gain, so each layer
# changes the logits as much as the embedding does and its quantization error shows.
CONFIG = tiny_config(hidden_size=64, intermediate_size=128, head_dim=16, initializer_range=0.125)
SEED = 3
# The axes each layer weight contracts (the model's einsums), per layer: the scales are per
# output channel, one for each index of the other axes.
CONTRACTED = {
    "self_attn": {"q_proj": (0,), "k_proj": (0,), "v_proj": (0,), "o_proj": (0, 1)},
    "mlp": {"gate_proj": (0,), "up_proj": (0,), "down_proj": (0,)},
}
# qwix maps a channel's absmax to these (ints: qmax + 1/2, so the top bucket is a full one).
SYMMETRIC_BOUND = {jnp.int8: 127.5, jnp.int4: 7.5, jnp.float8_e4m3fn: 448.0}


@functools.cache
def dense():
    return random_state(CONFIG, SEED)


@functools.cache
def quantized(scheme: str):
    return quantize.quantize(CONFIG, *dense(), scheme)


@functools.cache
def batch():
    return random_batch(SEED + 1, 8, 12, CONFIG.vocab_size)


def layer_weights(state) -> dict[tuple[str, str], np.ndarray | dict]:
    """{(module, name): the stacked weight} for the seven weights of every layer, as stored."""
    pure = nnx.to_pure_dict(state)["layers"]
    return {
        (module, name): pure[module][name] for module, names in CONTRACTED.items() for name in names
    }


def with_dequantized_weights(graphdef, state, quantized_state):
    """The dense model with its layer weights replaced by the quantized ones, dequantized in
    NumPy (stored value x scale)."""
    pure = nnx.to_pure_dict(state)
    for (module, name), weight in layer_weights(quantized_state).items():
        qvalue, scale = (np.asarray(weight["array"][part]) for part in ("qvalue", "scale"))
        pure["layers"][module][name] = jnp.asarray(qvalue.astype(np.float32) * scale)
    state = nnx.clone(state)
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


@pytest.mark.parametrize("scheme", ["w8", "w4", "fp8"])
def test_stored_weights_are_round_to_nearest_per_output_channel(scheme):
    qtype = quantize.SCHEMES[scheme].weight_qtype
    originals = layer_weights(dense()[1])
    for key, stored in layer_weights(quantized(scheme)[1]).items():
        weight = np.asarray(originals[key])
        qvalue, scale = (np.asarray(stored["array"][part]) for part in ("qvalue", "scale"))
        assert qvalue.dtype == jnp.dtype(qtype), key
        axes = tuple(1 + axis for axis in CONTRACTED[key[0]][key[1]])  # 0 is the layer axis
        want_scale = np.abs(weight).max(axis=axes, keepdims=True) / SYMMETRIC_BOUND[qtype]
        np.testing.assert_allclose(scale, want_scale, rtol=1e-6, err_msg=str(key))
        error = np.abs(qvalue.astype(np.float32) * scale - weight)
        if scheme == "fp8":
            # e4m3 keeps 3 mantissa bits: half a spacing is 2^-4 of the value, or 2^-10 of the
            # scale among subnormals (below 2^-6).
            bound = scale * np.maximum(2.0**-4 * np.abs(weight / scale), 2.0**-10)
        else:
            bound = scale / 2
        assert np.all(error <= bound * (1 + 1e-5) + 1e-7), key


def test_the_compute_dtype_does_not_change_the_stored_weights():
    # The layers cast their weights to the compute dtype before use; under bfloat16 every weight
    # is still found and quantized (`quantize` raises if one is not), from the float32 values.
    config = tiny_config(
        hidden_size=64,
        intermediate_size=128,
        head_dim=16,
        initializer_range=0.125,
        dtype="bfloat16",
    )
    graphdef, state = random_state(config, SEED)
    got = layer_weights(quantize.quantize(config, graphdef, state, "w8")[1])
    for key, want in layer_weights(quantized("w8")[1]).items():
        for part in ("qvalue", "scale"):
            np.testing.assert_array_equal(got[key]["array"][part], want["array"][part])


@pytest.mark.parametrize("scheme", ["w8", "w4"])
def test_weight_only_model_is_the_dense_model_on_its_stored_weights(scheme):
    # Nothing but the seven layer weights is quantized (not the embedding, head, norms nor the
    # attention), so the logits are the dense model's on the dequantized weights, up to float
    # rounding of the differently ordered matmuls.
    ids, mask = batch()
    got = forward(*quantized(scheme), ids, mask)
    want = forward(*with_dequantized_weights(*dense(), quantized(scheme)[1]), ids, mask)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-5)


# Relative RMS rounding noise of 8-bit floats e4m3: 3 mantissa bits, so the spacing is 2^-3 of
# the binade and uniform rounding leaves 2^-3 / sqrt(12) of it; over log-uniform mantissas
# m in [1, 2), E[1/m^2] = 3 / (8 ln 2).
FP8_NOISE = 2.0**-3 / np.sqrt(12) * np.sqrt(3 / (8 * np.log(2)))


def relative_noise_power(weights: dict, scheme: str) -> float:
    """Predicted (noise / signal) power that quantization adds to each matmul's output, averaged
    over the seven weights: the weight's, plus the input's with activation quantization.

    Integers: rounding to a step s leaves uniform noise of power s^2 / 12. Weights: s is their
    channel's absmax / bound, from the dense weights. Activations: one scale per token over the
    n contracted entries, whose absmax is about sqrt(2 ln 2n) times their RMS for Gaussian ones.
    """
    chosen = quantize.SCHEMES[scheme]
    powers = []
    for (module, name), weight in weights.items():
        weight = np.asarray(weight)
        axes = tuple(1 + axis for axis in CONTRACTED[module][name])
        fan_in = int(np.prod([weight.shape[axis] for axis in axes]))
        if chosen.weight_qtype == jnp.float8_e4m3fn:
            power = FP8_NOISE**2
        else:
            step = (
                np.abs(weight).max(axis=axes, keepdims=True) / SYMMETRIC_BOUND[chosen.weight_qtype]
            )
            power = np.mean(np.broadcast_to(step, weight.shape) ** 2 / 12) / np.mean(weight**2)
        if chosen.act_qtype == jnp.float8_e4m3fn:
            power += FP8_NOISE**2
        elif chosen.act_qtype is not None:
            power += 2 * np.log(2 * fan_in) / (12 * SYMMETRIC_BOUND[chosen.act_qtype] ** 2)
        powers.append(power)
    return float(np.mean(powers))


@pytest.mark.parametrize("scheme", ["w8", "w4", "w8a8", "fp8"])
def test_logit_error_follows_the_rounding_step(scheme):
    # Bound: each of the M = 7 x layers quantized matmuls adds noise of relative power p (above)
    # to its output; with unit-gain weights and pre-norms, to first order these independent
    # noises add up in the logits, so RMS(logit error) / RMS(logits) ~ sqrt(M p), both centred
    # per position (softmax ignores shifts). Measured over seeds: 0.8 to 1.05 of the prediction;
    # the test allows 0.5 to 1.5, so it fails if quantization is skipped (0) or done on the
    # wrong axes or with a wrong scale (far above).
    ids, mask = batch()
    real = np.asarray(mask)[..., None]
    want = np.asarray(forward(*dense(), ids, mask))
    error = np.asarray(forward(*quantized(scheme), ids, mask)) - want
    centred = lambda x: x - x.mean(-1, keepdims=True)
    measured = np.sqrt(np.sum(real * centred(error) ** 2) / np.sum(real * centred(want) ** 2))
    matmuls = 7 * CONFIG.num_hidden_layers
    predicted = np.sqrt(matmuls * relative_noise_power(layer_weights(dense()[1]), scheme))
    assert 0.5 * predicted <= measured <= 1.5 * predicted, (measured, predicted)


@pytest.mark.parametrize("scheme", ["w8", "w4", "w8a8", "fp8"])
def test_weight_bytes(scheme):
    c = CONFIG
    d, m, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    q_heads, kv_heads = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    matrix_elements = layers * (2 * d * q_heads + 2 * d * kv_heads + 3 * d * m)
    # One float32 scale per output channel: q, k, v per head dim, o and down per hidden unit,
    # gate and up per intermediate unit.
    scales = layers * (q_heads + 2 * kv_heads + 2 * d + 2 * m)
    unquantized = c.vocab_size * d + (2 * layers + 1) * d  # tied embedding, norm scales
    bits = 4 if scheme == "w4" else 8
    dense_bytes = quantize.weight_bytes(dense()[1])
    assert dense_bytes == 4 * (unquantized + matrix_elements)
    quantized_bytes = quantize.weight_bytes(quantized(scheme)[1])
    assert quantized_bytes == 4 * unquantized + matrix_elements * bits // 8 + 4 * scales
    # The layer weights: a quarter (int8, fp8) or an eighth (int4) of float32, plus the scales.
    layer_ratio = (quantized_bytes - 4 * unquantized) / (dense_bytes - 4 * unquantized)
    assert bits / 32 < layer_ratio < bits / 32 + 0.03


@functools.cache
def prompts():
    return random_batch(SEED + 2, 32, 12, CONFIG.vocab_size, pads=(0, 2, 5, 11))


def test_quantized_cache_decoding_equals_one_forward_pass():
    # Each step's logits (from the KV cache) are one forward pass's over the prompt and the
    # tokens generated before it. Weight-only: activation rounding would be discontinuous, and
    # the float rounding of the cache's shorter matmuls flips some of its roundings.
    ids, mask = prompts()
    graphdef, state = quantized("w8")
    new_tokens = 5
    tokens, step_logits, _ = map(
        np.asarray, decode.greedy_decode(graphdef, state, ids, mask, new_tokens)
    )
    full_ids = np.concatenate([ids, tokens[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens[:, :-1], bool)], axis=1)
    logits = np.asarray(forward(graphdef, state, full_ids, full_mask))[:, ids.shape[1] - 1 :]
    np.testing.assert_allclose(step_logits, logits, atol=1e-5 * np.abs(logits).max())
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("scheme", ["w8", "w8a8"])
def test_int8_greedy_decoding_agrees_with_the_dense_model(scheme):
    # A random model's top two logits are often close (V = 64, no training), so int8's 2-3%
    # logit noise flips some greedy choices: over seeds 90-100% of first tokens and 60-90% of
    # 6-token continuations agree. Broken quantization (wrong scales or axes) agrees on about
    # 1/V of tokens, so 80% and 50% separate the two with room to spare.
    ids, mask = prompts()
    want = np.asarray(decode.greedy_decode(*dense(), ids, mask, 6)[0])
    got = np.asarray(decode.greedy_decode(*quantized(scheme), ids, mask, 6)[0])
    assert np.mean(got[:, 0] == want[:, 0]) >= 0.8
    assert np.mean(np.all(got == want, axis=1)) >= 0.5


def test_evaluate_runs_the_quantized_model():
    # `evaluate.evaluate` takes the quantized pair unchanged: its loss is the quantized model's
    # teacher-forced loss, recomputed here in NumPy from its logits.
    spec = eval_helpers.make_spec(prompt_strategy="cot", vocab_size=CONFIG.vocab_size)
    _, eval_set = eval_helpers.world_and_eval_set(spec, 8)
    graphdef, state = quantized("w8")
    metrics = evaluate.evaluate(graphdef, state, eval_set, spec, batch_size=8, max_pred_tokens=8)
    logits = np.asarray(
        forward(
            graphdef,
            state,
            jnp.asarray(eval_set["input_ids"]),
            jnp.asarray(eval_set["attention_mask"]),
        )
    )
    total, count = eval_helpers.teacher_forced_loss(logits, eval_set["labels"])
    np.testing.assert_allclose(metrics["loss"], total / count, rtol=1e-5)
    assert 0 <= metrics["answer_acc"] <= 1


def test_unknown_scheme_is_one_line():
    with pytest.raises(ConfigError, match=r"quantize.scheme='int3' is invalid: expected one of"):
        quantize.quantize(CONFIG, *dense(), "int3")
