"""Evaluation (docs/tasks.md section 4): metrics against NumPy recomputations, the answer rule,
the variants.

Compilations dominate the runtime, so the tests share a few eval sets and one batch size.
"""

import functools
import json
import os
import subprocess
import sys

import eval_helpers as helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from model_helpers import forward, random_state, tiny_config
from transformers.loss.loss_utils import ForCausalLMLoss

from cotlab_jax import data, losses, model, rundir, sharding
from cotlab_jax import evaluate as ev
from cotlab_jax.evaluate import cli

N_TASKS = 30  # with BATCH 8, the last batch is padded
BATCH = 8
MAX_PRED = 12


@functools.cache
def real_model():
    return random_state(tiny_config(vocab_size=helpers.VOCAB), 0)


@functools.cache
def evaluated(strategy: str):
    """(spec, eval set, metrics, per-task arrays) of the random-weight model."""
    spec = helpers.make_spec(prompt_strategy=strategy)
    _, eval_set = helpers.world_and_eval_set(spec, N_TASKS)
    metrics, per_task = ev.evaluate(
        *real_model(),
        eval_set,
        spec,
        batch_size=BATCH,
        max_pred_tokens=MAX_PRED,
        return_predictions=True,
    )
    return spec, eval_set, metrics, per_task


def check_loss(metrics, per_task, eval_set):
    logits = np.asarray(
        forward(
            *real_model(),
            jnp.asarray(eval_set["input_ids"]),
            jnp.asarray(eval_set["attention_mask"]),
        )
    )
    total, count = helpers.teacher_forced_loss(logits, eval_set["labels"])
    np.testing.assert_allclose(metrics["loss"], total / count, rtol=1e-5)
    np.testing.assert_array_equal(
        per_task["loss_count"], (eval_set["labels"][:, 1:] != -100).sum(1)
    )


# --- losses -------------------------------------------------------------------------------------


def test_teacher_forced_loss_matches_hugging_face():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 9, 13)).astype(np.float32)
    labels = rng.integers(0, 13, (4, 9))
    labels[rng.random((4, 9)) < 0.4] = -100
    labels[2] = -100  # a row without labels
    labels[3, 1:] = -100
    labels[3, 0] = 5  # only the first label: it is never predicted
    loss, sums, counts = jax.jit(losses.teacher_forced_loss)(
        jnp.asarray(logits), jnp.asarray(labels)
    )
    want = ForCausalLMLoss(torch.tensor(logits), torch.tensor(labels), 13)
    np.testing.assert_allclose(loss, want.item(), rtol=1e-6)
    shifted = np.concatenate([labels[:, 1:], np.full((4, 1), -100)], axis=1)
    for row in range(4):
        row_sum = torch.nn.functional.cross_entropy(
            torch.tensor(logits[row]), torch.tensor(shifted[row]), reduction="sum"
        )
        np.testing.assert_allclose(sums[row], row_sum.item(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(counts, (shifted != -100).sum(1))
    assert counts[2] == counts[3] == 0 and sums[2] == sums[3] == 0


# --- metrics from the evaluation step -----------------------------------------------------------


@pytest.mark.parametrize("strategy", ["standard", "cot"])
def test_chain_metrics_match_numpy(strategy):
    spec, eval_set, metrics, per_task = evaluated(strategy)
    predictions = per_task["predictions"]
    T = spec.target_len
    assert predictions.shape == (N_TASKS, T)
    # Every step's logits, by one forward pass over the query and the model's own predictions.
    ids = np.concatenate([eval_set["query_ids"], predictions], axis=1)
    mask = np.concatenate([eval_set["query_mask"], np.ones_like(predictions, bool)], axis=1)
    logits = np.asarray(forward(*real_model(), jnp.asarray(ids), jnp.asarray(mask)))
    step_logits = logits[:, spec.query_len - 1 : spec.query_len - 1 + T]
    np.testing.assert_array_equal(predictions, step_logits.argmax(-1))  # greedy, fed back

    rows = np.arange(N_TASKS)
    last = eval_set["chain"][rows, eval_set["k"] - 1]  # the last example's chain [tasks, C]
    n_targets = eval_set["c"] if strategy == "cot" else np.ones(N_TASKS, int)
    first_target = 0 if strategy == "cot" else eval_set["c"] - 1
    acc, loss = np.zeros(T), np.zeros(T)
    for j in range(T):
        has = n_targets > j
        target = last[rows, np.minimum(first_target + j, spec.C - 1)]
        correct = has & (predictions[:, j] == target)
        ce = np.array(
            [helpers.cross_entropy(step_logits[t, j], target[t]) if has[t] else 0.0 for t in rows]
        )
        np.testing.assert_array_equal(per_task["chain_correct"][:, j], correct)
        np.testing.assert_array_equal(per_task["chain_mask"][:, j], has)
        np.testing.assert_allclose(per_task["chain_loss"][:, j], ce, rtol=1e-5, atol=1e-5)
        acc[j], loss[j] = correct[has].mean(), ce[has].mean()
        assert metrics[f"chain_acc_{j}"] == pytest.approx(acc[j], abs=1e-12)
        assert metrics[f"chain_loss_{j}"] == pytest.approx(loss[j], rel=1e-5)
    answer_step = n_targets - 1
    answer_correct = predictions[rows, answer_step] == last[rows, eval_set["c"] - 1]
    np.testing.assert_array_equal(per_task["answer_correct"], answer_correct)
    assert metrics["answer_acc"] == pytest.approx(answer_correct.mean(), abs=1e-12)
    assert metrics["answer_loss"] == pytest.approx(
        per_task["chain_loss"][rows, answer_step].mean(), rel=1e-6
    )
    assert set(metrics) == {
        "loss",
        "answer_acc",
        "answer_loss",
        *(f"chain_{m}_{j}" for m in ("acc", "loss") for j in range(T)),
    }
    assert acc.sum() > 0  # the random model is right now and then: the comparison is not vacuous
    check_loss(metrics, per_task, eval_set)


def test_special_token_metrics_match_numpy():
    spec, eval_set, metrics, per_task = evaluated("hybrid_special_token")
    predictions, gen_len = per_task["predictions"], per_task["gen_len"]
    assert predictions.shape == (N_TASKS, MAX_PRED)
    eos, pad = spec.token_id("eos"), spec.token_id("pad")
    answers = helpers.answers(eval_set)
    for t in range(N_TASKS):
        row = predictions[t].tolist()
        length = row.index(eos) + 1 if eos in row else MAX_PRED
        assert gen_len[t] == length and all(token == pad for token in row[length:])
        want = helpers.answer_rule(
            int(eval_set["query_ids"][t, -1]), row[:length], answers[t], spec
        )
        assert (per_task["answer_correct"][t], per_task["format_ok"][t]) == want
    assert metrics["answer_acc"] == per_task["answer_correct"].mean()
    assert metrics["format_acc"] == per_task["format_ok"].mean()
    for q in ev.GEN_LEN_PERCENTILES:
        assert metrics[f"gen_len_p{q}"] == np.percentile(gen_len, q)
    check_loss(metrics, per_task, eval_set)


HAND_BUILT = [
    # (last prompt token, generated tokens, answer, correct, format_ok); tokens by name or id.
    ("in_e", ["ans_s", 3, "ans_e", "eos"], 3, True, True),
    ("in_e", ["ans_s", 3, "ans_e", "eos"], 4, False, True),  # wrong answer
    ("in_e", ["think_s", 1, 2, "think_e", "ans_s", 3, "ans_e", "eos"], 3, True, True),
    ("in_e", ["ans_s", 3, "eos"], 3, False, False),  # no <ans_e>
    ("in_e", [3, "ans_e", "eos"], 3, False, False),  # no <ans_s>
    ("in_e", ["ans_s", "think_s", "ans_e", "eos"], 3, False, False),  # a reserved id as answer
    ("in_e", ["ans_s", 3, "ans_e", 5, 5, 5, 5, 5], 3, False, False),  # no eos within the budget
    ("in_e", ["eos"], 3, False, False),
    ("ans_s", [3, "ans_e", "eos"], 3, True, True),  # a forced <ans_s> is part of the ending
    ("think_s", [3, "ans_e", "eos"], 3, False, False),
]


def test_answer_rule_on_hand_built_outputs():
    spec = helpers.make_spec(prompt_strategy="hybrid_special_token")
    names = dict(
        in_e="input_end",
        ans_s="answer_start",
        ans_e="answer_end",
        eos="eos",
        think_s="think_start",
        think_e="think_end",
    )

    def ids(tokens):
        return [spec.token_id(names[t]) if isinstance(t, str) else t for t in tokens]

    T, pad = 8, spec.token_id("pad")
    cases = [(ids([last])[0], ids(gen), answer, c, f) for last, gen, answer, c, f in HAND_BUILT]
    # Extra tokens after the eos (there: a second, wrong answer) are ignored.
    after_eos = ids(["ans_s", 3, "ans_e", "eos", "ans_s", 4, "ans_e", "eos"])
    tokens = np.array([gen + [pad] * (T - len(gen)) for _, gen, *_ in cases] + [after_eos] * 2)
    lengths = np.array([len(gen) for _, gen, *_ in cases] + [4, 4])
    last = np.array([c[0] for c in cases] + ids(["in_e", "in_e"]))
    answer = np.array([c[2] for c in cases] + [3, 4])
    want = [c[3:] for c in cases] + [(True, True), (False, True)]
    correct, format_ok = jax.jit(ev.score_generations, static_argnames="spec")(
        last, tokens, lengths, answer, spec
    )
    assert (
        list(zip(np.asarray(correct).tolist(), np.asarray(format_ok).tolist(), strict=True)) == want
    )
    for i, expected in enumerate(want):  # the plain oracle agrees
        assert (
            helpers.answer_rule(int(last[i]), tokens[i, : lengths[i]].tolist(), answer[i], spec)
            == expected
        )


@functools.cache
def scripted_setup():
    """A hybrid eval set, its most common answer `a`, and a usable token `b` != a."""
    spec = helpers.make_spec(prompt_strategy="hybrid_special_token")
    _, eval_set = helpers.world_and_eval_set(spec, N_TASKS)
    values, counts = np.unique(helpers.answers(eval_set), return_counts=True)
    a = int(values[counts.argmax()])
    b = (a + 1) % spec.usable_vocab_size
    return spec, eval_set, a, b


def test_scripted_answers_plain_and_forced():
    """A model that answers `<ans_s> a <ans_e> <eos>` (after a forced <think_s>: `b <think_e>`
    first) is right exactly on the tasks whose answer is a."""
    spec, eval_set, a, b = scripted_setup()
    tok = spec.token_id
    script = {
        tok("input_end"): tok("answer_start"),
        tok("answer_start"): a,
        a: tok("answer_end"),
        tok("answer_end"): tok("eos"),
        tok("think_start"): b,
        b: tok("think_end"),
        tok("think_end"): tok("answer_start"),
    }
    graphdef, state = helpers.scripted_model(spec, script, default=tok("eos"))
    want_acc = (helpers.answers(eval_set) == a).mean()
    assert 0 < want_acc < 1
    for force, gen_len in [(None, 4), ("answer", 3), ("think", 6)]:
        variant = eval_set if force is None else ev.force_token(eval_set, spec, force)
        metrics, per_task = ev.evaluate(
            graphdef,
            state,
            variant,
            spec,
            batch_size=BATCH,
            max_pred_tokens=MAX_PRED,
            return_predictions=True,
        )
        assert metrics["format_acc"] == 1.0, force
        assert metrics["answer_acc"] == pytest.approx(want_acc, abs=1e-12), force
        assert metrics["gen_len_p50"] == metrics["gen_len_p99"] == gen_len, force
        np.testing.assert_array_equal(per_task["predictions"][:, gen_len:], tok("pad"))

    # Without <ans_e> nothing is in format, whatever the answer.
    script[a] = tok("eos")
    graphdef, state = helpers.scripted_model(spec, script, default=tok("eos"))
    metrics = ev.evaluate(
        graphdef, state, eval_set, spec, batch_size=BATCH, max_pred_tokens=MAX_PRED
    )
    assert metrics["format_acc"] == metrics["answer_acc"] == 0.0 and metrics["gen_len_p50"] == 3


def test_metrics_do_not_depend_on_the_batch_size():
    spec, eval_set, metrics, per_task = evaluated("cot")
    other, other_per_task = ev.evaluate(
        *real_model(),
        eval_set,
        spec,
        batch_size=7,
        max_pred_tokens=MAX_PRED,
        return_predictions=True,
    )
    assert other.keys() == metrics.keys()
    for name, value in metrics.items():
        assert other[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    for name in ("predictions", "chain_correct", "answer_correct", "loss_count"):
        np.testing.assert_array_equal(other_per_task[name], per_task[name])


def test_evaluate_with_parameters_and_batches_sharded_over_a_mesh():
    """As the trainer calls it: state sharded by the logical rules, batches over the data axes."""
    spec, eval_set, metrics, per_task = evaluated("cot")
    mesh = sharding.make_mesh({"data": 4, "tensor": 2}, jax.devices()[:8])
    graphdef, state = real_model()
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    with jax.set_mesh(mesh):
        sharded, sharded_per_task = ev.evaluate(
            graphdef,
            state,
            eval_set,
            spec,
            batch_size=BATCH,
            max_pred_tokens=MAX_PRED,
            return_predictions=True,
            batch_sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))),
        )
    np.testing.assert_array_equal(sharded_per_task["predictions"], per_task["predictions"])
    for name, value in metrics.items():
        assert sharded[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name


# --- variants -----------------------------------------------------------------------------------


def split_examples(tokens: list[int], spec) -> list[list[int]]:
    """Real query tokens -> the examples (each starting at <in_s>); the <bos> prefix is dropped."""
    starts = [i for i, t in enumerate(tokens) if t == spec.token_id("input_start")]
    return [tokens[s:e] for s, e in zip(starts, starts[1:] + [len(tokens)], strict=True)]


def without_think(example: list[int], spec) -> list[int]:
    if spec.token_id("think_start") not in example:
        return example
    start = example.index(spec.token_id("think_start"))
    return example[:start] + example[example.index(spec.token_id("think_end")) + 1 :]


def check_dropped(eval_set, dropped_set, dropped, spec):
    """The new queries are the old ones with the think spans of exactly `dropped` removed."""
    bos = spec.token_id("bos")
    old = helpers.real_tokens(eval_set["query_ids"], eval_set["query_mask"])
    new = helpers.real_tokens(dropped_set["query_ids"], dropped_set["query_mask"])
    for t in range(len(old)):
        examples = split_examples(old[t], spec)
        assert len(examples) == eval_set["k"][t]
        want = [bos] + [
            token
            for e, example in enumerate(examples)
            for token in (without_think(example, spec) if dropped[t, e] else example)
        ]
        assert new[t] == want, t
    np.testing.assert_array_equal(
        dropped_set["query_positions"], model.positions_from_mask(dropped_set["query_mask"])
    )
    for name in ("input_ids", "labels", "target_ids", "is_cot"):
        np.testing.assert_array_equal(dropped_set[name], eval_set[name])


def cot_demos(eval_set):
    K = eval_set["is_cot"].shape[1]
    return eval_set["is_cot"] & (np.arange(K) < eval_set["k"][:, None] - 1)


def test_drop_every_think_span_and_none():
    spec, eval_set, _, _ = scripted_setup()
    every = ev.drop_think_spans(eval_set, spec, spec.K, "first")
    assert not np.any((every["query_ids"] == spec.token_id("think_start")) & every["query_mask"])
    np.testing.assert_array_equal(every["think_dropped"], cot_demos(eval_set))
    check_dropped(eval_set, every, every["think_dropped"], spec)
    none = ev.drop_think_spans(eval_set, spec, 0, "first")
    for name in ("query_ids", "query_mask", "query_positions"):  # the re-layout is exact
        np.testing.assert_array_equal(none[name], eval_set[name])


@pytest.mark.parametrize("which", ["first", "last"])
def test_drop_first_or_last_k(which):
    spec, eval_set, _, _ = scripted_setup()
    n_drop = 2
    variant = ev.drop_think_spans(eval_set, spec, n_drop, which)
    demos = cot_demos(eval_set)
    want = np.zeros_like(demos)
    for t in range(len(demos)):
        chosen = np.flatnonzero(demos[t])
        want[t, chosen[:n_drop] if which == "first" else chosen[::-1][:n_drop]] = True
    assert 0 < want.sum() < demos.sum()
    np.testing.assert_array_equal(variant["think_dropped"], want)
    check_dropped(eval_set, variant, want, spec)


def test_drop_random_k_is_keyed():
    spec, eval_set, _, _ = scripted_setup()
    n_drop = 1
    variant = ev.drop_think_spans(eval_set, spec, n_drop, "random", jax.random.key(0))
    dropped, demos = variant["think_dropped"], cot_demos(eval_set)
    assert not np.any(dropped & ~demos)
    np.testing.assert_array_equal(dropped.sum(1), np.minimum(demos.sum(1), n_drop))
    check_dropped(eval_set, variant, dropped, spec)
    again = ev.drop_think_spans(eval_set, spec, n_drop, "random", jax.random.key(0))
    np.testing.assert_array_equal(again["query_ids"], variant["query_ids"])
    other = ev.drop_think_spans(eval_set, spec, n_drop, "random", jax.random.key(1))
    assert np.any(other["think_dropped"] != dropped)


def test_force_token_appends_to_every_query():
    spec, eval_set, _, _ = scripted_setup()
    for which, name in [("think", "think_start"), ("answer", "answer_start")]:
        forced = ev.force_token(eval_set, spec, which)
        assert forced["query_ids"].shape == (N_TASKS, spec.query_len + 1)
        np.testing.assert_array_equal(forced["query_ids"][:, -1], spec.token_id(name))
        np.testing.assert_array_equal(forced["query_ids"][:, :-1], eval_set["query_ids"])
        np.testing.assert_array_equal(forced["query_mask"][:, :-1], eval_set["query_mask"])
        assert forced["query_mask"][:, -1].all()
        np.testing.assert_array_equal(
            forced["query_positions"][:, -1], eval_set["query_mask"].sum(1)
        )
        np.testing.assert_array_equal(forced["target_ids"], eval_set["target_ids"])
    with pytest.raises(ValueError, match="no special tokens"):
        ev.force_token(eval_set, helpers.make_spec(prompt_strategy="cot"), "think")
    with pytest.raises(ValueError, match="no think spans"):
        ev.drop_think_spans(eval_set, helpers.make_spec(prompt_strategy="cot"), 1, "first")


def test_evaluate_at_another_chain_length_and_example_count():
    spec = helpers.make_spec(prompt_strategy="cot")
    world, _ = helpers.world_and_eval_set(spec, N_TASKS)
    longer = spec.with_changes(chain_length_choices=(5,), n_example_choices=(7,))
    assert longer.seq_len > spec.seq_len
    eval_set = data.build_eval_set(world, data.root_keys(0)["eval"], longer, BATCH)
    metrics = ev.evaluate(
        *real_model(), eval_set, longer, batch_size=BATCH, max_pred_tokens=MAX_PRED
    )
    assert {f"chain_acc_{j}" for j in range(5)} <= metrics.keys()
    assert all(np.isfinite(value) for value in metrics.values())
    with pytest.raises(ValueError, match="another spec"):
        ev.evaluate(*real_model(), eval_set, spec, batch_size=BATCH, max_pred_tokens=MAX_PRED)


# --- command line -------------------------------------------------------------------------------


def test_cli_argument_errors(tmp_path):
    with pytest.raises(SystemExit, match="--workdir is required"):
        cli.run_cli(None, "latest")
    with pytest.raises(SystemExit, match="no such directory"):
        cli.run_cli(str(tmp_path / "missing"), "latest")
    with pytest.raises(SystemExit, match="--step='last'"):
        cli.run_cli(str(tmp_path), "last")
    with pytest.raises(SystemExit, match="go together"):
        cli.run_cli(str(tmp_path), "latest", drop_think="first")
    assert rundir.parse_step("latest") == "latest" and rundir.parse_step("500") == 500
    cot = helpers.make_spec(prompt_strategy="cot")
    with pytest.raises(SystemExit, match="no think spans"):
        cli.check_variant(cot, "first", None, None)
    with pytest.raises(SystemExit, match="no special tokens"):
        cli.check_variant(cot, None, "answer", None)
    fixed = helpers.make_spec(
        prompt_strategy="cot",
        ablation_fixed_dag=True,
        n_input_choices=(4,),
        chain_length_choices=(4,),
    )
    with pytest.raises(SystemExit, match="fixed DAG"):
        cli.check_variant(fixed, None, None, 5)
    cli.check_variant(helpers.make_spec(prompt_strategy="cot_special_token"), "random", "think", 5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir=/nonexistent/run"], "no such directory"),
        (["--workdir=/tmp", "--force=sometimes"], "force"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "cotlab_jax.evaluate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and message in result.stderr


def test_cli_with_a_stand_in_run(tmp_path, monkeypatch, capsys):
    """The command line's variants on a saved eval set, with `rundir.load_run` replaced by a stub
    that returns the scripted model (the trainer's own end-to-end test covers real runs)."""
    spec, eval_set, a, _ = scripted_setup()
    tok = spec.token_id
    graphdef, state = helpers.scripted_model(
        spec,
        {tok("answer_start"): a, a: tok("answer_end"), tok("answer_end"): tok("eos")},
        default=tok("eos"),
    )
    calls = helpers.stand_in_run(
        monkeypatch,
        str(tmp_path),
        spec,
        eval_set,
        graphdef,
        state,
        batch_size=BATCH,
        max_pred_tokens=MAX_PRED,
    )
    out = tmp_path / "result.json"
    n = 2 * BATCH
    result = cli.run_cli(
        str(tmp_path),
        "7",
        force="answer",
        drop_think="last",
        drop_k=1,
        n_eval_tasks=n,
        out=str(out),
        save_predictions=True,
    )
    assert calls == [(str(tmp_path), 7)]
    assert json.loads(out.read_text()) == result == json.loads(capsys.readouterr().out)
    assert result["step"] == 7 and result["n_eval_tasks"] == n
    assert result["variant"] == dict(
        drop_think="last",
        drop_k=1,
        drop_seed=None,
        force="answer",
        prompt_strategy=None,
        n_inputs=None,
        n_parents=None,
        chain_length=None,
        n_examples=None,
        eval_dataset=None,
    )
    want_acc = (helpers.answers(eval_set)[:n] == a).mean()
    assert result["metrics"]["format_acc"] == 1.0
    assert result["metrics"]["answer_acc"] == pytest.approx(want_acc)
    with np.load(tmp_path / "result.npz") as saved:
        assert saved["predictions"].shape == (n, MAX_PRED)
    with pytest.raises(SystemExit, match="frozen eval set has"):
        cli.run_cli(str(tmp_path), "latest", n_eval_tasks=N_TASKS + 1)
    with pytest.raises(SystemExit, match="no checkpoint at step 8"):
        cli.run_cli(str(tmp_path), "8")
    assert calls[-2:] == [(str(tmp_path), "latest"), (str(tmp_path), 8)]
