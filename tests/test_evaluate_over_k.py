"""Evaluation over example counts: example indices against the reference layout, the vmapped
program against one count at a time, and against eval sets whose earlier examples never existed.

Compilations dominate the runtime: the tests share eval sets, one batch size and one list of
counts per strategy.
"""

import functools
import json

import eval_helpers as helpers
import jax
import numpy as np
import pytest
from model_helpers import random_state, tiny_config

from cotlab_jax import config as config_lib
from cotlab_jax import data, numpy_reference
from cotlab_jax import evaluate as ev
from cotlab_jax.evaluate import cli

N_TASKS = 12  # with BATCH 8, the last batch is padded
BATCH = 8
MAX_PRED = 12
STRATEGIES = (
    "standard",
    "cot",
    "standard_special_token",
    "cot_special_token",
    "hybrid_special_token",
)
COT_STRATEGIES = ("cot", "cot_special_token")

example_index = jax.jit(ev.example_index, static_argnames="spec")
keep_last_examples = jax.jit(ev.keep_last_examples, static_argnames="spec")
layout_tasks = jax.jit(jax.vmap(data.layout_task, (0, 0, 0, 0, 0, 0, None)), static_argnums=6)


@functools.cache
def real_model():
    return random_state(tiny_config(vocab_size=helpers.VOCAB), 0)


def relayout(eval_set, spec, **fields):
    """The eval set with `fields` (inputs, chain, k, is_cot) replaced, laid out under `spec`."""
    out = dict(eval_set, **fields)
    out.update(
        jax.tree.map(
            np.asarray,
            layout_tasks(
                *(out[name] for name in ("inputs", "chain", "n", "c", "k", "is_cot")), spec
            ),
        )
    )
    return out


@functools.cache
def spec_and_eval_set(strategy: str):
    """The hybrid eval set's tasks laid out under `strategy`: one sampler compilation for all
    five, and the hybrid tasks' tokens avoid the reserved ids of every strategy."""
    hybrid = helpers.make_spec(prompt_strategy="hybrid_special_token")
    eval_set = helpers.world_and_eval_set(hybrid, N_TASKS)[1]
    if strategy == hybrid.prompt_strategy:
        return hybrid, eval_set
    spec = helpers.make_spec(prompt_strategy=strategy)
    is_cot = (np.arange(spec.K) < eval_set["k"][:, None]) & ("cot" in strategy)
    return spec, relayout(eval_set, spec, is_cot=is_cot)


@functools.cache
def kept_layout(strategy: str, n_examples: int):
    """`keep_last_examples` of the whole eval set."""
    spec, eval_set = spec_and_eval_set(strategy)
    fields = {name: eval_set[name] for name in (*ev.EVAL_FIELDS, "query_positions")}
    return {**eval_set, **jax.tree.map(np.asarray, keep_last_examples(fields, n_examples, spec))}


def evaluate(eval_set, spec):
    return ev.evaluate(
        *real_model(),
        eval_set,
        spec,
        batch_size=BATCH,
        max_pred_tokens=MAX_PRED,
        return_predictions=True,
    )


@functools.cache
def over_k(strategy: str):
    """(spec, eval set, {K': metrics}, {K': per-task arrays}) for K' = 1 .. K."""
    spec, eval_set = spec_and_eval_set(strategy)
    metrics, per_task = ev.evaluate_over_k(
        *real_model(),
        eval_set,
        spec,
        batch_size=BATCH,
        max_pred_tokens=MAX_PRED,
        return_predictions=True,
    )
    return spec, eval_set, metrics, per_task


def assert_same_per_task(got, want, context):
    assert got.keys() == want.keys(), context
    for name in want:
        if np.issubdtype(want[name].dtype, np.floating):
            np.testing.assert_allclose(
                got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=f"{name} {context}"
            )
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} {context}")


# --- example indices ----------------------------------------------------------------------------


def reference_index(eval_set, spec, query_is_cot, forced):
    """(training, query) example indices [tasks, L] from the reference's example-by-example
    layout (queries ending in the `forced` tokens), left-padded with -1; checks on the way that
    the layout's tokens are the eval set's."""
    ids = numpy_reference.special_ids(spec.vocab_size)
    rows = {"input_ids": [], "query_ids": []}
    for t in range(len(eval_set["k"])):
        n, c, k = (int(eval_set[name][t]) for name in ("n", "c", "k"))
        tokens = {"input_ids": [], "query_ids": []}
        index = {"input_ids": [-1] * spec.prefix_len, "query_ids": [-1] * spec.prefix_len}
        for i in range(k):
            inputs, chain = eval_set["inputs"][t, i, :n].tolist(), eval_set["chain"][t, i, :c]
            train, *_ = numpy_reference.example(
                spec.prompt_strategy, inputs, chain.tolist(), eval_set["is_cot"][t, i], ids
            )
            query, _, query_part, _ = numpy_reference.example(
                spec.prompt_strategy, inputs, chain.tolist(), query_is_cot[t, i], ids
            )
            for name, example in [
                ("input_ids", train),
                ("query_ids", query if i < k - 1 else query_part + forced),
            ]:
                tokens[name] += example
                index[name] += [i] * len(example)
        for name, mask in [("input_ids", "attention_mask"), ("query_ids", "query_mask")]:
            real = helpers.real_tokens(eval_set[name][t : t + 1], eval_set[mask][t : t + 1])[0]
            assert real[spec.prefix_len :] == tokens[name], (name, t)
            rows[name].append([-1] * (eval_set[name].shape[1] - len(index[name])) + index[name])
    return np.array(rows["input_ids"]), np.array(rows["query_ids"])


def check_example_index(eval_set, spec, query_is_cot=None, forced=()):
    want_train, want_query = reference_index(
        eval_set, spec, eval_set["is_cot"] if query_is_cot is None else query_is_cot, list(forced)
    )
    n, c = eval_set["n"], eval_set["c"]
    np.testing.assert_array_equal(
        example_index(eval_set["input_ids"], eval_set["attention_mask"], n, c, spec), want_train
    )
    np.testing.assert_array_equal(
        example_index(eval_set["query_ids"], eval_set["query_mask"], n, c, spec), want_query
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_example_index_matches_the_reference_layout(strategy):
    spec, eval_set = spec_and_eval_set(strategy)
    for name in ("n", "c", "k"):
        assert len(set(eval_set[name].tolist())) > 1, name
    check_example_index(eval_set, spec)


def test_example_index_of_the_query_variants():
    spec, eval_set = spec_and_eval_set("cot_special_token")
    dropped = ev.drop_think_spans(eval_set, spec, 2, "last")
    assert dropped["think_dropped"].any()
    check_example_index(dropped, spec, query_is_cot=eval_set["is_cot"] & ~dropped["think_dropped"])
    check_example_index(
        ev.force_token(eval_set, spec, "think"), spec, forced=[spec.token_id("think_start")]
    )


# --- the vmapped program ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", COT_STRATEGIES)
def test_vmapped_counts_equal_one_count_at_a_time(strategy):
    spec, _, metrics_by_k, per_task_by_k = over_k(strategy)
    assert list(metrics_by_k) == list(range(1, spec.K + 1))
    for count in range(1, spec.K + 1):
        metrics, per_task = evaluate(kept_layout(strategy, count), spec)
        assert_same_per_task(per_task_by_k[count], per_task, f"K'={count}")
        assert metrics_by_k[count] == pytest.approx(metrics, rel=1e-5, abs=1e-6, nan_ok=True)
    # Fewer examples take labelled tokens from the tasks with more.
    assert (per_task_by_k[1]["loss_count"] < per_task_by_k[spec.K]["loss_count"]).any()


def fewer_examples(eval_set, spec, n_examples):
    """The eval set of the same tasks without their earlier examples: each task's last
    min(k, n_examples) examples moved to the front and laid out afresh."""
    K, k = spec.K, eval_set["k"]
    kept = np.minimum(k, n_examples)
    source = np.minimum((k - kept)[:, None] + np.arange(K), K - 1)
    valid = np.arange(K) < kept[:, None]

    def shifted(name, fill):
        extra = (1,) * (eval_set[name].ndim - 2)
        rows = np.take_along_axis(eval_set[name], source.reshape(source.shape + extra), axis=1)
        return np.where(valid.reshape(valid.shape + extra), rows, fill)

    return relayout(
        eval_set,
        spec,
        inputs=shifted("inputs", -1),
        chain=shifted("chain", -1),
        is_cot=shifted("is_cot", False),
        k=kept.astype(np.int32),
    )


LAYOUT_FIELDS = (
    "input_ids",
    "labels",
    "attention_mask",
    "positions",
    "query_ids",
    "query_mask",
    "query_positions",
    "target_ids",
)


@pytest.mark.parametrize("strategy", COT_STRATEGIES)
def test_fewer_examples_equal_tasks_without_the_earlier_ones(strategy):
    spec, eval_set, metrics_by_k, per_task_by_k = over_k(strategy)
    for count in (1, 2, 4):
        oracle = fewer_examples(eval_set, spec, count)
        assert (oracle["k"] < eval_set["k"]).any()
        np.testing.assert_array_equal(helpers.answers(oracle), helpers.answers(eval_set))
        kept = kept_layout(strategy, count)
        for name in LAYOUT_FIELDS:  # token for token, before any model runs
            np.testing.assert_array_equal(kept[name], oracle[name], err_msg=f"{name} K'={count}")
        metrics, per_task = evaluate(oracle, spec)
        assert_same_per_task(per_task_by_k[count], per_task, f"K'={count}")
        assert metrics_by_k[count] == pytest.approx(metrics, rel=1e-5, abs=1e-6, nan_ok=True)


@pytest.mark.parametrize("strategy", COT_STRATEGIES)
def test_all_examples_is_plain_evaluate(strategy):
    spec, eval_set, metrics_by_k, per_task_by_k = over_k(strategy)
    metrics, per_task = evaluate(eval_set, spec)
    assert_same_per_task(per_task_by_k[spec.K], per_task, "K'=K")
    assert metrics_by_k[spec.K] == pytest.approx(metrics, rel=1e-5, abs=1e-6, nan_ok=True)
    flat = ev.flatten_over_k(metrics_by_k)
    assert list(flat) == [
        f"{name}_k{count}" for count in range(1, spec.K + 1) for name in ("answer_acc", "loss")
    ]
    assert flat[f"loss_k{spec.K}"] == metrics_by_k[spec.K]["loss"]
    assert ev.flatten_over_k({2: {"loss": 1.0, "x": 3.0}}, names=("x",)) == {"x_k2": 3.0}


def test_bad_example_counts_are_refused():
    spec, eval_set = spec_and_eval_set("cot")
    for counts, message in [
        (
            [0],
            r"example_counts=\[0\] is invalid: 0 is not an integer in "
            r"\[1, 5\]",
        ),
        ([1, 6], r"6 is not an integer in \[1, 5\]"),
        ([2.0], "2.0 is not an integer"),
        (["2"], "'2' is not an integer"),
        ([True], "True is not an integer"),
        ([], "at least one count"),
        ([2, 2], "once"),
    ]:
        with pytest.raises(config_lib.ConfigError, match=message):
            ev.evaluate_over_k(
                *real_model(),
                eval_set,
                spec,
                example_counts=counts,
                batch_size=BATCH,
                max_pred_tokens=MAX_PRED,
            )
    assert config_lib.parse_example_counts(np.array([3, 1]), spec.K) == (3, 1)


# --- command line -------------------------------------------------------------------------------


def test_cli_over_k(tmp_path, monkeypatch, capsys):
    spec, eval_set, metrics_by_k, _ = over_k("cot")
    helpers.stand_in_run(
        monkeypatch,
        str(tmp_path),
        spec,
        eval_set,
        *real_model(),
        batch_size=BATCH,
        max_pred_tokens=MAX_PRED,
    )
    out = tmp_path / "result.json"
    result = cli.run_cli(str(tmp_path), "latest", over_k=True, out=str(out))
    assert json.loads(out.read_text()) == result == json.loads(capsys.readouterr().out)
    assert list(result["metrics_by_k"]) == [str(count) for count in range(1, spec.K + 1)]
    for count, metrics in metrics_by_k.items():
        assert result["metrics_by_k"][str(count)] == {
            name: cli._json_value(value) for name, value in metrics.items()
        }
    all_examples = result["metrics_by_k"][str(spec.K)]
    assert result["metrics"].keys() == all_examples.keys()
    for name, value in result["metrics"].items():
        assert all_examples[name] == (None if value is None else pytest.approx(value, rel=1e-5))

    # As many counts as the default, so the compiled program is shared.
    counts = [str(count) for count in range(spec.K, 0, -1)]
    chosen = cli.run_cli(str(tmp_path), "latest", over_k=True, example_counts=counts)
    assert list(chosen["metrics_by_k"]) == counts
    for count in counts:
        for name, value in chosen["metrics_by_k"][count].items():
            want = result["metrics_by_k"][count][name]
            assert value == (None if want is None else pytest.approx(want, rel=1e-5))
    assert "metrics_by_k" not in cli.run_cli(str(tmp_path), "latest")
    with pytest.raises(SystemExit, match="needs --over_k"):
        cli.run_cli(str(tmp_path), "latest", example_counts="1,2")
    with pytest.raises(SystemExit, match="comma-separated positive integers"):
        cli.run_cli(str(tmp_path), "latest", over_k=True, example_counts="1,two")
    with pytest.raises(
        SystemExit,
        match=r"--example_counts='1,6' is invalid: 6 is not an "
        r"integer in \[1, 5\]",
    ):
        cli.run_cli(str(tmp_path), "latest", over_k=True, example_counts="1,6")
