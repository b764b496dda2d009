"""OSSCAR structured pruning: the layer solver against NumPy oracles and planted solutions, and
pruned models against the original and against Hugging Face `transformers`."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from model_helpers import forward, random_batch, random_state
from model_helpers import tiny_config as tiny_model_config
from test_train import ROOT, tiny_config

from cotlab_jax import export, hf_convert, model, prune, train
from cotlab_jax.config import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def correlated_inputs(rng, n: int, m: int) -> np.ndarray:
    """Activations with correlated, unevenly scaled columns (like an MLP's hidden units)."""
    mixing = np.eye(m) + rng.normal(0, 1 / np.sqrt(m), (m, m))
    return (rng.normal(size=(n, m)) @ mixing) * rng.uniform(0.2, 3.0, m)


def duplicated_layer(seed: int, clusters: int = 12, copies: int = 4, n: int = 300, d: int = 16):
    """A layer whose neurons come in `clusters` groups of scaled copies of one activation: any
    set with one neuron per cluster reproduces the dense output exactly (the copies' weights
    merge into it), a set missing a cluster cannot. Row norms are random, so magnitude misses."""
    rng = np.random.default_rng(seed)
    m = clusters * copies
    cluster = rng.permutation(np.repeat(np.arange(clusters), copies))
    inputs = rng.normal(size=(n, clusters))[:, cluster] * rng.uniform(0.5, 2.0, m)
    dense = rng.normal(size=(m, d)) * rng.uniform(0.1, 3.0, (m, 1))
    return inputs.T @ inputs, dense, cluster


def one_per_cluster(kept, cluster) -> bool:
    return np.array_equal(np.sort(cluster[kept]), np.arange(cluster.max() + 1))


def test_osscar_recovers_a_planted_exact_subset():
    tiny_ridge = prune.SearchOptions(ridge=1e-9)
    backward_only = prune.SearchOptions(ridge=1e-9, local_search_iters=0)
    backward_found = []
    for seed in range(4):
        gram, dense, cluster = duplicated_layer(seed)
        keep = [cluster.max() + 1]
        osscar = prune.prune_layer(gram, dense, keep, options=tiny_ridge)
        assert one_per_cluster(osscar.kept, cluster)
        assert abs(osscar.stats["relative_error"]) < 1e-9
        magnitude = prune.prune_layer(gram, dense, keep, method="magnitude_refit")
        assert not one_per_cluster(magnitude.kept, cluster)
        assert magnitude.stats["relative_error"] > 0.05
        backward = prune.prune_layer(gram, dense, keep, options=backward_only)
        backward_found.append(one_per_cluster(backward.kept, cluster))
    assert not all(backward_found)  # the local search is what finds it in some layers


@pytest.mark.parametrize("keep_fraction", [0.125, 0.25, 0.5, 0.75, 0.9])
def test_osscar_beats_magnitude_on_random_layers(keep_fraction):
    rng = np.random.default_rng(int(keep_fraction * 1000))
    inputs = correlated_inputs(rng, 400, 96)
    dense = rng.normal(size=(96, 24))
    gram = inputs.T @ inputs
    keep = [round(keep_fraction * 96)]
    errors = {
        method: prune.prune_layer(gram, dense, keep, method=method).stats["relative_error"]
        for method in prune.METHODS
    }
    assert errors["osscar"] <= errors["magnitude_refit"] * (1 + 1e-9)
    assert errors["magnitude_refit"] <= errors["magnitude"] * (1 + 1e-9)
    assert errors["osscar"] < 0.95 * errors["magnitude"]


def test_osscar_beats_magnitude_on_grouped_heads():
    """Units of 4 rows (heads) in 3 partitions (KV groups), 2 of 4 kept in each."""
    rng = np.random.default_rng(11)
    inputs = correlated_inputs(rng, 300, 48)
    dense = rng.normal(size=(48, 12))
    partitions = np.repeat(np.arange(3), 4)
    results = {
        method: prune.prune_layer(inputs.T @ inputs, dense, [2, 2, 2], 4, partitions, method)
        for method in prune.METHODS
    }
    for result in results.values():
        assert np.array_equal(np.bincount(partitions[result.kept]), [2, 2, 2])
    assert results["osscar"].stats["relative_error"] <= results["magnitude_refit"].stats[
        "relative_error"
    ] * (1 + 1e-9)


@pytest.mark.parametrize("unit_size, partitions", [(1, None), (3, np.repeat(np.arange(2), 6))])
def test_refit_objective_and_search_match_numpy_lstsq(unit_size, partitions):
    rng = np.random.default_rng(5 + unit_size)
    n, m, d, ridge = 200, 36, 10, 0.05
    inputs = correlated_inputs(rng, n, m)
    dense = rng.normal(size=(m, d))
    gram = inputs.T @ inputs
    mu = ridge * np.mean(np.sum(inputs**2, axis=0))
    options = prune.SearchOptions(ridge=ridge)
    gram_reg = prune.regularised_gram(gram, ridge)
    cross = gram_reg @ dense
    n_units = m // unit_size
    parts = np.zeros(n_units, np.int64) if partitions is None else partitions
    keep = [int(np.sum(parts == p)) // 2 for p in range(parts.max() + 1)]
    kept, search = prune.osscar_search(gram_reg, cross, unit_size, keep, parts, options)
    assert search["swaps_accepted"] >= 0 and len(kept) == sum(keep)

    def oracle(kept_units):
        """argmin ||X_S W - X W0||^2 + mu ||W - W0_S||^2 by lstsq on the stacked system."""
        cols = (np.asarray(kept_units)[:, None] * unit_size + np.arange(unit_size)).ravel()
        design = np.vstack([inputs[:, cols], np.sqrt(mu) * np.eye(len(cols))])
        target = np.vstack([inputs @ dense, np.sqrt(mu) * dense[cols]])
        weight = np.linalg.lstsq(design, target, rcond=None)[0]
        full = np.zeros_like(dense)
        full[cols] = weight
        loss = np.sum((inputs @ (full - dense)) ** 2) + mu * np.sum((full - dense) ** 2)
        constant = np.sum((inputs @ dense) ** 2) + mu * np.sum(dense**2)
        error = np.sum((inputs @ (full - dense)) ** 2) / np.sum((inputs @ dense) ** 2)
        return cols, weight, 0.5 * (loss - constant), error

    cols, weight, objective, error = oracle(kept)
    # The search's low-rank bookkeeping ends at the closed-form refit of its support.
    np.testing.assert_allclose(search["search_weight"], weight, rtol=1e-7, atol=1e-9)
    assert search["search_objective"] == pytest.approx(objective, rel=1e-9)
    # The public refit, objective and error, on another support.
    other = np.sort(rng.choice(n_units, n_units // 3, replace=False))
    cols, weight, objective, error = oracle(other)
    np.testing.assert_allclose(prune.refit(gram_reg, cross, cols), weight, rtol=1e-7, atol=1e-9)
    assert prune.reduced_objective(gram_reg, cross, cols, weight) == pytest.approx(
        objective, rel=1e-9
    )
    assert prune.relative_error(gram, dense, cols, weight) == pytest.approx(error, rel=1e-9)
    result = (
        prune.prune_layer(
            gram, dense, [len(other)], unit_size, method="magnitude_refit", options=options
        )
        if partitions is None
        else None
    )
    if result is not None:
        cols, weight, objective, error = oracle(result.kept)
        np.testing.assert_allclose(result.weight, weight, rtol=1e-7, atol=1e-9)
        assert result.stats["relative_error"] == pytest.approx(error, rel=1e-9)


def small_model(**overrides):
    config = tiny_model_config(num_attention_heads=8, num_key_value_heads=2, **overrides)
    graphdef, state = random_state(config, 3)
    ids, mask = random_batch(4, 10, 18, config.vocab_size, pads=(0, 4, 9))
    return config, graphdef, state, dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("head_units", prune.HEAD_UNITS)
def test_keeping_everything_gives_the_original_logits(head_units):
    config, graphdef, state, batch = small_model()
    result = prune.prune_params(
        config, graphdef, state, batch, mlp_keep=1.0, heads_keep=1.0, head_units=head_units
    )
    assert result.config == config
    for layer in result.report["layers"]:
        assert layer["mlp"]["kept"] == list(range(config.intermediate_size))
        assert abs(layer["mlp"]["relative_error"]) < 1e-10
    ids, mask = random_batch(9, 5, 14, config.vocab_size)
    original = np.asarray(forward(graphdef, state, ids, mask))
    pruned = np.asarray(forward(result.graphdef, result.state, ids, mask))
    real = np.asarray(mask)
    np.testing.assert_allclose(pruned[real], original[real], atol=2e-5)


def hf_model(config, state):
    hf_config = transformers.LlamaConfig(
        **hf_convert.to_hf_config(config), attn_implementation="eager"
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(
        {
            name: torch.from_numpy(array)
            for name, array in hf_convert.to_hf_state_dict(state, config).items()
        }
    )
    return hf


def hf_layer0_mlp_output(hf, ids, mask) -> np.ndarray:
    """HF's layer-0 MLP output [B, L, D] (a forward hook)."""
    captured = []
    handle = hf.model.layers[0].mlp.register_forward_hook(
        lambda module, inputs, output: captured.append(output.numpy())
    )
    with torch.no_grad():
        hf(
            input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
            attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
            position_ids=torch.from_numpy(np.asarray(model.positions_from_mask(mask), np.int64)),
        )
    handle.remove()
    return captured[0]


@pytest.mark.parametrize(
    "heads_keep, head_units", [(None, "query_heads"), (0.5, "query_heads"), (0.5, "kv_groups")]
)
def test_pruned_model_exports_to_hf_and_matches_its_logits(heads_keep, head_units):
    config, graphdef, state, batch = small_model()
    result = prune.prune_params(
        config, graphdef, state, batch, mlp_keep=0.5, heads_keep=heads_keep, head_units=head_units
    )
    kv = config.num_key_value_heads // (2 if head_units == "kv_groups" and heads_keep else 1)
    assert result.config == dataclasses.replace(
        config,
        intermediate_size=32,
        num_attention_heads=8 if heads_keep is None else 4,
        num_key_value_heads=kv,
    )
    hf = hf_model(result.config, result.state)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
            attention_mask=torch.from_numpy(np.asarray(mask, np.int64)),
            position_ids=torch.from_numpy(np.asarray(model.positions_from_mask(mask), np.int64)),
        ).logits.numpy()
    ours = np.asarray(forward(result.graphdef, result.state, ids, mask))
    real = np.asarray(mask)
    assert np.abs(theirs[real]).max() > 1.0
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4)
    if heads_keep is None:
        # Layer 0's MLP sees the same inputs in both models: the reported calibration error is
        # the one transformers measures between the dense and the pruned MLP.
        dense_out = hf_layer0_mlp_output(hf_model(config, state), ids, mask)[real]
        pruned_out = hf_layer0_mlp_output(hf, ids, mask)[real]
        error = np.sum((pruned_out - dense_out) ** 2) / np.sum(dense_out**2)
        reported = result.report["layers"][0]["mlp"]["relative_error"]
        assert 0.01 < reported < 1
        assert error == pytest.approx(reported, rel=1e-4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny CoT run trained for 2 steps: (config, workdir)."""
    workdir = str(tmp_path_factory.mktemp("prune") / "run")
    config = tiny_config("cot")
    config.train.n_tasks = 8 * 2
    train.train_and_evaluate(config, workdir)
    return config, workdir


def test_prune_run_writes_an_hf_dir_the_lab_evaluates(tiny_run, tmp_path):
    config, workdir = tiny_run
    out = str(tmp_path / "pruned")
    report = prune.prune_run(workdir, out, calibration_tasks=6, mlp_keep=0.25, heads_keep=0.5)
    with open(os.path.join(out, "prune_report.json")) as f:
        assert json.load(f)["layers"] == report["layers"]
    batch = prune.calibration_batch(config, 6)
    assert report["calibration_tokens"] == int(np.sum(batch["attention_mask"])) > 6 * 10
    pruned_config, _, params = export.load_hf_model(out)
    assert (pruned_config.intermediate_size, pruned_config.num_attention_heads) == (16, 1)
    assert model.count_params(params) == report["params"][1] < report["params"][0]
    # (`export.evaluate_hf(out, workdir)` evaluates such a directory: tests/test_export.py.)


def test_prune_cli_rejects_a_bad_fraction_in_one_line(tiny_run, tmp_path):
    _, workdir = tiny_run
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cotlab_jax.prune",
            f"--workdir={workdir}",
            f"--out={tmp_path / 'x'}",
            "--mlp_keep=0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "prune mlp_keep=0.0 is invalid: expected a fraction in (0, 1]"
    )
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mlp_keep=0.0), "mlp_keep=0.0"),
        (dict(mlp_keep=1.5), "mlp_keep=1.5"),
        (dict(heads_keep=0.1), "heads_keep"),
        (dict(head_units="heads"), "head_units='heads'"),
        (dict(method="random"), "method='random'"),
    ],
)
def test_bad_arguments_say_which(overrides, message):
    config, graphdef, state, batch = small_model()
    with pytest.raises(ConfigError, match=message):
        prune.prune_params(config, graphdef, state, batch, **overrides)


def test_low_rank_updates_match_fresh_solves():
    """Every removal, addition and swap prediction of `Support` against a fresh inverse."""
    rng = np.random.default_rng(8)
    unit, n_units, d = 2, 15, 7
    inputs = correlated_inputs(rng, 120, unit * n_units)
    gram_reg = prune.regularised_gram(inputs.T @ inputs, 0.03)
    cross = rng.normal(size=(unit * n_units, d)) * 10
    state = prune.Support(gram_reg, cross, unit)

    def check():
        cols = (np.flatnonzero(state.kept)[:, None] * unit + np.arange(unit)).ravel()
        inverse = np.zeros_like(gram_reg)
        inverse[np.ix_(cols, cols)] = np.linalg.inv(gram_reg[np.ix_(cols, cols)])
        weight = inverse @ cross
        np.testing.assert_allclose(state.P, inverse, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(state.W, weight, rtol=1e-8, atol=1e-10)
        if state.T is not None:
            np.testing.assert_allclose(state.T, inverse @ gram_reg, atol=1e-9)
            np.testing.assert_allclose(state.R, cross - gram_reg @ weight, atol=1e-8)
        assert state.objective == pytest.approx(-0.5 * np.sum(weight * cross), rel=1e-10)

    check()
    state.remove(np.array([3, 9]), search_terms=False)
    check()
    state.refresh_search_terms()
    check()
    partitions = np.zeros(n_units, np.int64)
    for remove, add in (([0, 5, 11], [3]), ([1], [9, 5]), ([2, 3], [0])):
        state.remove(np.array(remove))
        check()
        state.add(np.array(add))
        check()
    for size in (1, 2, 3):
        kept, pruned = np.flatnonzero(state.kept), np.flatnonzero(~state.kept)
        remove = np.sort(rng.choice(kept, size, replace=False))
        before = state.objective
        add, change = state.swap_change(remove, pruned, partitions, [size])
        assert len(add) == size and not set(add) & set(remove)
        state.remove(remove)
        state.add(add)
        check()
        assert state.objective - before == pytest.approx(change, rel=1e-8, abs=1e-9)
