"""Sampled evaluation: the answer rules, the majority vote, temperature / top-p sampling against
oracles, and the command line on another prompt strategy and task shape."""

import functools
import json
import os
import subprocess
import sys
from collections import Counter

import eval_helpers as helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import forward, random_batch, random_state, tiny_config

from cotlab_jax import data, decode, rundir, sampling
from cotlab_jax import evaluate as ev
from cotlab_jax.evaluate import cli

BATCH = 8
MAX_PRED = 10
NAMES = dict(
    in_e="input_end",
    ans_s="answer_start",
    ans_e="answer_end",
    eos="eos",
    pad="pad",
    think_s="think_start",
    think_e="think_end",
)


@functools.cache
def hybrid_spec():
    return helpers.make_spec(prompt_strategy="hybrid_special_token")


@functools.cache
def real_model(vocab_size: int = 64):
    return random_state(tiny_config(vocab_size=vocab_size), 0)


# --- answer rules -------------------------------------------------------------------------------


def reference_rule(last: int, generated: list[int], spec) -> int:
    """The reference trainer's rule as it is written there (core/train.py): strip every pad, need
    4 tokens, [-4] <ans_s>, [-2] <ans_e>, answer [-3]. A forced <ans_s> ending the prompt is
    read as part of the output."""
    output = ([last] if last == spec.token_id("answer_start") else []) + generated
    kept = [t for t in output if t != spec.token_id("pad")]
    if (
        len(kept) < 4
        or kept[-2] != spec.token_id("answer_end")
        or kept[-4] != spec.token_id("answer_start")
    ):
        return ev.INVALID_ANSWER
    return kept[-3]


def vllm_rule(generated: list[int], spec) -> int:
    """The reference's vLLM evaluator (inference/vllm/evaluator_special_token.py)."""
    if len(generated) >= 3 and generated[-2] == spec.token_id("answer_end"):
        return generated[-3]
    return ev.INVALID_ANSWER


def strict_rule(last: int, generated: list[int], spec) -> int:
    """This lab's rule, from the plain oracle of tests/eval_helpers.py."""
    _, format_ok = helpers.answer_rule(last, generated, -1, spec)
    return [last, *generated][-3] if format_ok else ev.INVALID_ANSWER


ORACLES = dict(
    reference=lambda last, gen, spec: reference_rule(last, gen, spec),
    vllm=lambda last, gen, spec: vllm_rule(gen, spec),
    strict=lambda last, gen, spec: strict_rule(last, gen, spec),
)

# (prompt's last token, generated tokens up to the eos or the budget,
#  the answer read by the reference / vllm / strict rule; None = unreadable)
HAND_MADE = [
    ("in_e", ["ans_s", 3, "ans_e", "eos"], 3, 3, 3),
    ("in_e", [4, 4, "ans_s", 3, "ans_e", "eos"], 3, 3, 3),
    ("in_e", ["ans_s", 3, "ans_e", 5], 3, 3, None),  # cut by the budget: no <eos> check
    ("in_e", ["ans_s", 3, "pad", "ans_e", "eos"], 3, "pad", None),  # a generated pad is stripped
    ("in_e", ["ans_s", "think_s", "ans_e", "eos"], "think_s", "think_s", None),  # reserved answer
    ("in_e", [4, 3, "ans_e", "eos"], None, 3, None),  # no <ans_s>
    ("in_e", [3, "ans_e", "eos"], None, 3, None),  # 3 tokens
    ("ans_s", [3, "ans_e", "eos"], 3, 3, 3),  # a forced <ans_s>
    ("think_s", [3, "ans_e", "eos"], None, 3, None),
    ("in_e", ["ans_e", "eos"], None, None, None),
    ("in_e", ["eos"], None, None, None),
]


def ids(tokens, spec):
    return [spec.token_id(NAMES[t]) if isinstance(t, str) else t for t in tokens]


def run_rule(rule, last, generated, spec, T):
    pad = spec.token_id("pad")
    tokens = np.array([g + [pad] * (T - len(g)) for g in generated], np.int32)
    lengths = np.array([len(g) for g in generated], np.int32)
    answer, valid = jax.jit(ev.extract_answers, static_argnames=("spec", "rule"))(
        jnp.asarray(last, jnp.int32), tokens, lengths, spec, rule
    )
    return np.asarray(answer), np.asarray(valid)


@pytest.mark.parametrize("rule", ev.ANSWER_RULES)
def test_answer_rules_on_hand_made_outputs(rule):
    spec = hybrid_spec()
    last = ids([case[0] for case in HAND_MADE], spec)
    generated = [ids(case[1], spec) for case in HAND_MADE]
    column = 2 + ev.ANSWER_RULES.index(rule)
    want = [
        ev.INVALID_ANSWER if case[column] is None else ids([case[column]], spec)[0]
        for case in HAND_MADE
    ]
    answer, valid = run_rule(rule, last, generated, spec, T=8)
    assert answer.tolist() == want
    assert valid.tolist() == [w != ev.INVALID_ANSWER for w in want]
    # The plain oracles agree on the table.
    assert [ORACLES[rule](a, g, spec) for a, g in zip(last, generated, strict=True)] == want


@pytest.mark.parametrize("rule", ev.ANSWER_RULES)
def test_answer_rules_on_random_outputs(rule):
    """Random generations over an alphabet of a few ordinary ids and every reserved one."""
    spec = hybrid_spec()
    rng = np.random.default_rng(ev.ANSWER_RULES.index(rule))
    alphabet = [0, 1, 2] + ids(list(NAMES), spec)
    T, rows = 7, 400
    generated, last = [], []
    for _ in range(rows):
        length = int(rng.integers(1, T + 1))
        row = [int(t) for t in rng.choice(alphabet, length)]
        if rng.random() < 0.5:  # a well-formed ending, so that every branch is reached
            row[-4:] = ids(["ans_s", 1, "ans_e", "eos"], spec)[-len(row[-4:]) :]
        eos = spec.token_id("eos")
        row = row[: row.index(eos) + 1] if eos in row else row  # generation stops at the eos
        generated.append(row)
        last.append(int(rng.choice(ids(["in_e", "ans_s", "think_s"], spec))))
    answer, valid = run_rule(rule, last, generated, spec, T)
    want = [ORACLES[rule](a, g, spec) for a, g in zip(last, generated, strict=True)]
    assert answer.tolist() == want
    assert valid.tolist() == [w != ev.INVALID_ANSWER for w in want]
    assert 0.1 < valid.mean() < 0.9


# --- majority vote ------------------------------------------------------------------------------


def test_majority_vote_matches_counter_with_ties_and_invalid_outputs():
    """The reference votes with `Counter(pred_ids).most_common(1)[0][0]` (invalid = -100, a
    candidate like any other); ties go to the value seen first."""
    rng = np.random.default_rng(1)
    vote = jax.jit(sampling.majority_vote)
    for n_samples in (1, 2, 3, 4, 8):
        answers = rng.choice([ev.INVALID_ANSWER, 0, 1, 2, 5], (n_samples, 300)).astype(np.int32)
        want = [Counter(answers[:, b].tolist()).most_common(1)[0][0] for b in range(300)]
        assert np.asarray(vote(answers)).tolist() == want
    hand = np.array(
        [[7, -100, 3, 3, 1], [-100, 7, 3, 4, 2], [7, -100, 4, 4, 3], [-100, 7, 5, 5, 4]], np.int32
    )
    # ties of two: the first occurring value wins (also when that is the invalid sentinel)
    assert np.asarray(vote(hand)).tolist() == [7, -100, 3, 4, 1]


# --- sampling -----------------------------------------------------------------------------------


def numpy_nucleus(logits, temperature, top_p):
    """bool [V]: the smallest set of most probable tokens (float64) whose mass reaches top_p."""
    scaled = np.asarray(logits, np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cut = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1  # first index reaching top_p
    keep = np.zeros(len(probs), bool)
    keep[order[:cut]] = True
    return keep, probs


def test_choose_tokens_is_categorical_on_the_nucleus():
    """Exactly `jax.random.categorical` with the same keys on the logits the NumPy nucleus keeps;
    top_p is placed halfway between two cumulative masses so rounding cannot move the edge."""
    rng = np.random.default_rng(2)
    rows, vocab, temperature = 64, 23, 0.7
    logits = rng.normal(0, 2, (rows, vocab)).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), rows)
    top_p = np.empty(rows, np.float32)
    keeps = []
    for b in range(rows):
        _, probs = numpy_nucleus(logits[b], temperature, 1.0)
        masses = np.cumsum(np.sort(probs)[::-1])
        j = rng.integers(0, 6)
        top_p[b] = (masses[j] + masses[j + 1]) / 2 if b % 4 else 1.0
        keep, _ = numpy_nucleus(logits[b], temperature, top_p[b])
        assert keep.sum() == (j + 2 if b % 4 else vocab)
        keeps.append(keep)
    got = jax.jit(jax.vmap(sampling.choose_tokens, (0, 0, None, 0)))(
        logits[:, None], keys[:, None], temperature, top_p
    )[:, 0]
    for b in range(rows):
        masked = np.where(keeps[b], logits[b] / np.float32(temperature), -np.inf)
        assert int(got[b]) == int(jax.random.categorical(keys[b], masked)), b
        assert keeps[b][int(got[b])]


def test_sampled_first_tokens_follow_the_model_distribution():
    """5,000 draws of the first generated token of one prompt: every token's frequency is within
    5 binomial standard deviations of its probability under the temperature and nucleus."""
    graphdef, state = real_model(16)
    prompt, mask = random_batch(4, 1, 9, 16, pads=(2,))
    n, temperature, top_p = 5000, 1.5, 0.9
    logits = np.asarray(forward(graphdef, state, prompt, mask))[0, -1]
    keep, _ = numpy_nucleus(logits, temperature, top_p)
    want = np.where(keep, np.exp(logits / temperature - (logits / temperature).max()), 0.0)
    want /= want.sum()
    assert (want > 0.02).sum() >= 3  # a distribution worth testing
    keys = jax.random.split(jax.random.key(5), n)
    tokens, _ = sampling.sample_decode(
        graphdef,
        state,
        jnp.repeat(prompt, n, 0),
        jnp.repeat(mask, n, 0),
        1,
        None,
        0,
        keys,
        temperature,
        top_p,
    )
    freq = np.bincount(np.asarray(tokens[:, 0]), minlength=16) / n
    bound = 5 * np.sqrt(want * (1 - want) / n) + 1e-12
    assert np.all(np.abs(freq - want) <= bound), (freq, want)
    assert np.all(freq[~keep] == 0)


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1e-6)])
def test_greedy_limits_equal_greedy_decoding(temperature, top_p):
    graphdef, state = real_model()
    prompts, mask = random_batch(6, 6, 11, 64)
    greedy, _, _ = decode.greedy_decode(graphdef, state, prompts, mask, 8, -1, 0)  # no eos
    eos = int(greedy[0, 3])  # so that some rows stop early
    greedy, _, greedy_lengths = decode.greedy_decode(graphdef, state, prompts, mask, 8, eos, 0)
    keys = jax.random.split(jax.random.key(7), 6)
    tokens, lengths = sampling.sample_decode(
        graphdef, state, prompts, mask, 8, eos, 0, keys, temperature, top_p
    )
    np.testing.assert_array_equal(tokens, greedy)
    np.testing.assert_array_equal(lengths, greedy_lengths)
    assert np.asarray(greedy_lengths).min() < 8


# --- evaluation ---------------------------------------------------------------------------------


@functools.cache
def special_set(n_tasks=12):
    spec = hybrid_spec()
    return spec, helpers.world_and_eval_set(spec, n_tasks)[1]


class MarkovModel(nnx.Module):
    """A stand-in for `model.Llama` whose logits are `table[current token]`: random enough that
    samples differ, and fast to compile (the real model's decoding is tested above)."""

    def __init__(self, table):
        self.table = nnx.Variable(jnp.asarray(table, jnp.float32))

    def __call__(self, input_ids, positions, key_mask, kv_cache=None, cache_index=0):
        return self.table[...][input_ids], kv_cache

    def init_cache(self, batch_size, cache_length):
        return jnp.zeros(()), jnp.zeros(())


@functools.cache
def markov_model():
    """Random transitions, nudged along `<in_e> <ans_s> a <ans_e> <eos>` so that many samples
    are readable and some are right."""
    spec = hybrid_spec()
    tok = spec.token_id
    table = np.random.default_rng(8).normal(0, 1, (spec.vocab_size, spec.vocab_size))
    table[tok("input_end"), tok("answer_start")] += 3
    table[tok("answer_start"), : spec.usable_vocab_size] += 3
    table[: spec.usable_vocab_size, tok("answer_end")] += 3
    table[tok("answer_end"), tok("eos")] += 3
    return nnx.split(MarkovModel(table))


def test_evaluate_sampled_at_temperature_zero_is_evaluate():
    spec, eval_set = special_set()
    graphdef, state = markov_model()
    greedy, per_task = ev.evaluate(
        graphdef,
        state,
        eval_set,
        spec,
        batch_size=BATCH,
        max_pred_tokens=MAX_PRED,
        answer_rule="vllm",
        return_predictions=True,
    )
    sampled, sampled_per_task = ev.evaluate_sampled(
        graphdef,
        state,
        eval_set,
        spec,
        batch_size=BATCH,
        max_pred_tokens=MAX_PRED,
        n_samples=1,
        temperature=0.0,
        answer_rule="vllm",
        return_predictions=True,
    )
    for name in ("loss", "answer_acc", "format_acc", "gen_len_p50"):
        assert sampled[name] == pytest.approx(greedy[name], rel=1e-6), name
    np.testing.assert_array_equal(sampled_per_task["predictions"][:, 0], per_task["predictions"])


def test_evaluate_sampled_is_keyed_per_task_and_votes():
    """Sample s of task i is the same in any batch size; the vote is the samples' majority."""
    spec, eval_set = special_set()
    graphdef, state = markov_model()
    common = dict(
        max_pred_tokens=MAX_PRED,
        n_samples=3,
        temperature=1.0,
        seed=4,
        answer_rule="vllm",
        return_predictions=True,
    )
    metrics, per_task = ev.evaluate_sampled(
        graphdef, state, eval_set, spec, batch_size=BATCH, **common
    )
    _, other = ev.evaluate_sampled(graphdef, state, eval_set, spec, batch_size=5, **common)
    np.testing.assert_array_equal(other["predictions"], per_task["predictions"])
    predictions = per_task["predictions"]
    assert len({p.tobytes() for p in predictions.reshape(-1, MAX_PRED)}) > 1
    answers = np.array(
        [
            [
                vllm_rule(predictions[i, s, : per_task["gen_len"][i, s]].tolist(), spec)
                for s in range(3)
            ]
            for i in range(len(predictions))
        ]
    )
    votes = [Counter(row.tolist()).most_common(1)[0][0] for row in answers]
    assert per_task["vote"].tolist() == votes
    truth = helpers.answers(eval_set)
    assert metrics["answer_acc"] == pytest.approx(np.mean(np.array(votes) == truth))
    assert metrics["sample_answer_acc"] == pytest.approx(np.mean(answers == truth[:, None]))
    assert metrics["answer_acc"] > 0 and 0 < metrics["vote_invalid"] < 1  # not a trivial vote


def test_variant_spec_refuses_what_the_model_cannot_take():
    cot = helpers.make_spec(prompt_strategy="cot")
    with pytest.raises(ValueError, match="'cot', which has no special tokens"):
        ev.variant_spec(cot, prompt_strategy="cot_special_token")
    with pytest.raises(ValueError, match="reserves its top 9 ids"):
        ev.variant_spec(hybrid_spec(), prompt_strategy="cot")
    with pytest.raises(ValueError, match="no CoT-example probability recipe"):
        ev.variant_spec(
            helpers.make_spec(prompt_strategy="cot_special_token"),
            prompt_strategy="hybrid_special_token",
        )
    fixed = helpers.make_spec(
        prompt_strategy="cot",
        ablation_fixed_dag=True,
        n_input_choices=(4,),
        chain_length_choices=(4,),
    )
    with pytest.raises(ValueError, match="fixed DAG"):
        ev.variant_spec(fixed, n_inputs=3)
    with pytest.raises(ValueError, match="n_parents=0: expected an integer >= 1"):
        ev.variant_spec(cot, n_parents=0)
    assert (
        ev.variant_spec(cot, prompt_strategy="standard", n_inputs=3).prompt_strategy == "standard"
    )
    changed = ev.variant_spec(
        hybrid_spec(),
        prompt_strategy="cot_special_token",
        n_inputs=3,
        n_parents=2,
        chain_length=3,
        n_examples=4,
    )
    assert (changed.N, changed.M, changed.C, changed.K) == (3, 2, 3, 4)
    assert changed.cot_examples and changed.vocab_size == hybrid_spec().vocab_size


def test_cli_samples_a_fresh_cot_special_token_set(tmp_path, monkeypatch):
    """A hybrid-trained (stand-in) run evaluated on a fresh `cot_special_token` set with a
    changed chain length, 3 samples at temperature 0.8 and a majority vote. The scripted model
    answers `<ans_s> a <ans_e> <eos>` with logit gaps of 10 / 0.8, so at these keys every vote
    is a; the fresh set is the run's world with tasks from its eval key."""
    spec, frozen = special_set()
    world = helpers.world_and_eval_set(spec, 12)[0]
    fresh_spec = ev.variant_spec(spec, prompt_strategy="cot_special_token", chain_length=3)
    fresh = data.build_eval_set(world, data.root_keys(0)["eval"], fresh_spec, 16)
    truth = helpers.answers(fresh)
    a = int(np.bincount(truth).argmax())
    tok = spec.token_id
    graphdef, state = helpers.scripted_model(
        spec,
        {
            tok("input_end"): tok("answer_start"),
            tok("answer_start"): a,
            a: tok("answer_end"),
            tok("answer_end"): tok("eos"),
        },
        default=tok("eos"),
    )
    helpers.stand_in_run(
        monkeypatch,
        str(tmp_path),
        spec,
        frozen,
        graphdef,
        state,
        batch_size=BATCH,
        max_pred_tokens=MAX_PRED,
    )
    stub = rundir.load_run

    def load_with_world(workdir, step):
        run = stub(workdir, step)
        run.world = world
        return run

    monkeypatch.setattr(rundir, "load_run", load_with_world)
    out = tmp_path / "sampled.json"
    result = cli.run_cli(
        str(tmp_path),
        "latest",
        prompt_strategy="cot_special_token",
        chain_length=3,
        n_eval_tasks=16,
        n_samples=3,
        temperature=0.8,
        out=str(out),
    )
    assert json.loads(out.read_text()) == result
    assert result["prompt_strategy"] == "cot_special_token" and result["n_eval_tasks"] == 16
    assert result["answer_rule"] == "reference"
    assert result["sampling"] == dict(n_samples=3, temperature=0.8, top_p=1.0, seed=0)
    assert result["variant"]["prompt_strategy"] == "cot_special_token"
    assert result["metrics"]["answer_acc"] == pytest.approx(np.mean(truth == a))
    assert result["metrics"]["format_acc"] == 1.0
    assert 0 < result["metrics"]["answer_acc"] < 1
    # The model cannot take a strategy without special tokens; greedy samples cannot vote.
    with pytest.raises(SystemExit, match="reserves its top 9 ids"):
        cli.run_cli(str(tmp_path), "latest", prompt_strategy="cot")
    with pytest.raises(SystemExit, match="--n_samples=3 needs temperature > 0"):
        cli.run_cli(str(tmp_path), "latest", n_samples=3)
    with pytest.raises(SystemExit, match=r"--top_p=0.0: expected a number in \(0, 1\]"):
        cli.run_cli(str(tmp_path), "latest", temperature=1.0, top_p=0.0)


def test_cli_sampling_error_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "cotlab_jax.evaluate", "--workdir=/tmp", "--n_samples=3"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == "--n_samples=3 needs temperature > 0: greedy samples are all the same"
    )
