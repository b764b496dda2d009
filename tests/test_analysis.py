"""Analyses: attention capture, DAG recovery, the embedding probe, token coverage, figures.

The recovery metrics are checked against a plain re-statement of the layout (docs/tasks.md
section 3) and hand-built attention patterns whose scores are known; the model path by forcing
its attention.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_helpers import make_spec, world_and_eval_set
from model_helpers import forward, random_batch, random_state, tiny_config

from cotlab_jax import analysis, data, model

N_TASKS = 12
# Hybrid has both special-token forms (CoT and direct examples), so with these three every layout
# is covered by three eval sets, the slow part of this file.
CHAIN_STRATEGIES = ("cot", "hybrid_special_token")
_recovery_from_probs = jax.jit(analysis.dag_recovery_from_probs, static_argnames="spec")


@functools.partial(jax.jit, static_argnames="spec")
def _positions_and_starts(batch, spec):
    return (
        analysis.example_token_positions(batch, spec),
        analysis.example_start_positions(batch, spec),
    )


def spec_and_set(strategy: str):
    spec = make_spec(prompt_strategy=strategy)
    world, eval_set = world_and_eval_set(spec, N_TASKS)
    return spec, world, eval_set


# --- a plain layout oracle -----------------------------------------------------------------------


def layout_oracle(eval_set, b: int, spec: data.TaskSpec):
    """Task b's training sequence written from docs/tasks.md section 3: per position, its label
    ((example, DAG index as i or N + j), a marker name, or None for padding) and its example (-1
    for none)."""
    n, c, k = (int(eval_set[name][b]) for name in ("n", "c", "k"))
    labels, owners = (["<bos>"], [-1]) if spec.special_tokens else ([], [])
    for e in range(k):
        xs = [(e, i) for i in range(n)]
        think = [(e, spec.N + j) for j in range(c - 1)]
        answer = [(e, spec.N + c - 1)]
        cot = bool(eval_set["is_cot"][b, e])
        if spec.special_tokens:
            example = ["<in_s>", *xs, "<in_e>"]
            example += ["<think_s>", *think, "<think_e>"] if cot else []
            example += ["<ans_s>", *answer, "<ans_e>", "<eos>"]
        else:
            example = xs + (think if cot else []) + answer
        labels += example
        owners += [e] * len(example)
    pad = spec.seq_len - len(labels)
    return [None] * pad + labels, np.array([-1] * pad + owners)


def counted_tokens(eval_set, spec: data.TaskSpec):
    """Every chain token the recovery metrics count, from the oracle: dicts with the task, group,
    predicting row, parent positions and candidate positions (same example, up to the row)."""
    tokens = []
    for b in range(len(eval_set["k"])):
        labels, owners = layout_oracle(eval_set, b, spec)
        where = {label: t for t, label in enumerate(labels) if isinstance(label, tuple)}
        n, c, k = (int(eval_set[name][b]) for name in ("n", "c", "k"))
        for e in range(k):
            if not eval_set["is_cot"][b, e]:
                continue
            for j in range(c):
                row = where[(e, spec.N + j)] - 1
                parents = [
                    where[(e, int(a) if a < n else spec.N + int(a) - n)]
                    for a in eval_set["adj"][b, j][eval_set["parent_mask"][b, j]]
                ]
                candidates = [t for t in range(row + 1) if owners[t] == e]
                tokens.append(
                    dict(
                        task=b,
                        group="query" if e == k - 1 else "demo",
                        row=row,
                        parents=parents,
                        candidates=candidates,
                    )
                )
    return tokens


def test_example_token_positions_match_the_plain_layout():
    for strategy in (*CHAIN_STRATEGIES, "standard"):
        spec, _, eval_set = spec_and_set(strategy)
        layout_fields = {name: eval_set[name] for name in ("n", "c", "k", "is_cot")}
        positions, starts = map(np.asarray, _positions_and_starts(layout_fields, spec))
        assert positions.shape == (N_TASKS, spec.K, spec.N + spec.C)
        for b in range(N_TASKS):
            labels, owners = layout_oracle(eval_set, b, spec)
            assert sum(label is not None for label in labels) == eval_set["attention_mask"][b].sum()
            expected = np.full((spec.K, spec.N + spec.C), -1)
            for t, label in enumerate(labels):
                if isinstance(label, tuple):
                    expected[label] = t
            np.testing.assert_array_equal(positions[b], expected, err_msg=f"{strategy} task {b}")
            for e in range(int(eval_set["k"][b])):
                assert starts[b, e] == np.flatnonzero(owners == e)[0]
            # The tokens there are the task's inputs and chain tokens.
            tokens = np.concatenate([eval_set["inputs"][b], eval_set["chain"][b]], axis=1)
            written = positions[b] >= 0
            np.testing.assert_array_equal(
                eval_set["input_ids"][b][positions[b][written]], tokens[written]
            )


# --- hand-built attention ----------------------------------------------------------------------


def uniform_rows(attention_mask):
    """[B, L, L]: every row uniform over the real positions up to it (zero rows for padding)."""
    allowed = np.tril(np.ones((attention_mask.shape[1],) * 2, bool))[None] & attention_mask[:, None]
    counts = allowed.sum(-1, keepdims=True)
    return np.where(allowed, 1.0 / np.maximum(counts, 1), 0.0)


def parent_rows(eval_set, tokens, shift: int = 0):
    """[B, L, L]: uniform rows, except each counted token's row puts 1/m on its parents + shift."""
    rows = uniform_rows(eval_set["attention_mask"])
    for token in tokens:
        row = rows[token["task"], token["row"]]
        row[:] = 0.0
        row[np.asarray(token["parents"]) + shift] = 1.0 / len(token["parents"])
    return rows


def expected_means(tokens, score) -> dict[str, float]:
    out = {}
    for group in ("query", "demo"):
        values = [score(token) for token in tokens if token["group"] == group]
        out[group] = np.mean(values) if values else np.nan
    return out


@pytest.mark.parametrize("strategy", CHAIN_STRATEGIES)
def test_recovery_of_hand_built_attention(strategy):
    spec, _, eval_set = spec_and_set(strategy)
    tokens = counted_tokens(eval_set, spec)
    mask = eval_set["attention_mask"]
    rng = np.random.default_rng(0)
    noise = np.where(
        np.tril(np.ones((spec.seq_len,) * 2, bool))[None, None] & mask[:, None, None],
        rng.random((N_TASKS, 3, spec.seq_len, spec.seq_len)),
        0.0,
    )
    heads = np.stack(
        [
            parent_rows(eval_set, tokens),
            uniform_rows(mask),
            parent_rows(eval_set, tokens, shift=-1),
        ],
        axis=1,
    )  # [B, 3, L, L]
    probs = np.stack([heads, noise / np.maximum(noise.sum(-1, keepdims=True), 1e-9)])
    sums = _recovery_from_probs(jnp.asarray(probs, jnp.float32), eval_set, spec)
    means = analysis.finalize_dag_recovery(jax.tree.map(np.asarray, sums))

    uniform_mass = expected_means(
        tokens, lambda t: len(t["parents"]) / mask[t["task"], : t["row"] + 1].sum()
    )
    # Ties count against, so uniform attention picks the parents only when they are all it sees.
    uniform_top_m = expected_means(tokens, lambda t: len(t["candidates"]) == len(t["parents"]))
    for group in ("query", "demo"):
        count = sum(token["group"] == group for token in tokens)
        assert means[f"count_{group}"] == count
        mass, top_m = means[f"parent_mass_{group}"], means[f"parent_top_m_{group}"]
        assert mass.shape == top_m.shape == (2, 3)
        if not count:
            assert np.isnan(mass).all() and np.isnan(top_m).all()
            continue
        np.testing.assert_allclose(mass[0, 0], 1.0, rtol=1e-6)  # perfect
        assert top_m[0, 0] == 1.0
        np.testing.assert_allclose(mass[0, 1], uniform_mass[group], rtol=1e-5)  # uniform
        np.testing.assert_allclose(top_m[0, 1], uniform_top_m[group], rtol=1e-6)
        assert top_m[0, 2] == 0.0 and mass[0, 2] < 1.0  # off by one
        assert (mass[1] >= 0.0).all() and (mass[1] <= 1.0 + 1e-6).all()
    # Both groups are exercised by at least one strategy with these seeds.
    assert means["count_demo"] > 0


def test_batches_combine_exactly_and_standard_has_nothing_to_measure():
    spec, _, eval_set = spec_and_set("hybrid_special_token")
    # The shape of the hand-built test's probs, so the whole batch reuses its compilation.
    probs = jnp.broadcast_to(
        jnp.asarray(uniform_rows(eval_set["attention_mask"]), jnp.float32),
        (2, 3, N_TASKS, spec.seq_len, spec.seq_len),
    ).transpose(0, 2, 1, 3, 4)
    whole = analysis.finalize_dag_recovery(_recovery_from_probs(probs, eval_set, spec))
    half = N_TASKS // 2
    parts = [
        _recovery_from_probs(probs[:, rows], {k: v[rows] for k, v in eval_set.items()}, spec)
        for rows in (slice(0, half), slice(half, N_TASKS))
    ]
    combined = analysis.finalize_dag_recovery(analysis.combine_recovery_sums(parts))
    for name, value in whole.items():
        np.testing.assert_allclose(combined[name], value, rtol=1e-6)

    spec, _, eval_set = spec_and_set("standard")
    probs = jnp.asarray(uniform_rows(eval_set["attention_mask"])[None, :, None], jnp.float32)
    metrics = analysis.flat_recovery_metrics(
        analysis.finalize_dag_recovery(_recovery_from_probs(probs, eval_set, spec))
    )
    assert len(metrics) == 8 and all(np.isnan(v) for v in metrics.values())


# --- through the model -------------------------------------------------------------------------


def test_capture_keeps_the_logits_and_returns_attention():
    config = tiny_config()  # 4 heads over 2 key/value heads
    graphdef, state = random_state(config, 1)
    ids, mask = random_batch(0, 3, 12, config.vocab_size)
    capture = jax.jit(functools.partial(model.apply, return_attention=True))
    logits, probs = capture(graphdef, state, ids, model.positions_from_mask(mask), mask)
    np.testing.assert_allclose(logits, forward(graphdef, state, ids, mask), rtol=1e-5, atol=1e-5)
    assert probs.shape == (2, 3, 4, 12, 12) and probs.dtype == jnp.float32
    probs, mask = np.asarray(probs), np.asarray(mask)
    allowed = np.tril(np.ones((12, 12), bool))[None] & mask[:, None]  # [B, L, L]
    real_rows = mask[None, :, None, :, None]
    assert np.all(np.where(real_rows & ~allowed[None, :, None], probs, 0.0) == 0.0)
    np.testing.assert_allclose(np.where(real_rows[..., 0], probs.sum(-1), 1.0), 1.0, rtol=1e-5)


def test_capture_off_keeps_the_fused_attention(monkeypatch):
    config = tiny_config()
    graphdef, state = jax.eval_shape(functools.partial(model.init, config), jax.random.key(0))
    ids, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), bool)
    calls = []
    fused = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    def unfused(*args):
        raise AssertionError("the normal path must not compute probabilities")

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    with monkeypatch.context() as patch:
        patch.setattr(model, "attention_probabilities", unfused)
        jax.make_jaxpr(forward.__wrapped__)(graphdef, state, ids, mask)
    assert calls
    calls.clear()
    jax.make_jaxpr(functools.partial(model.apply, return_attention=True))(
        graphdef, state, ids, model.positions_from_mask(mask), mask
    )
    assert not calls


@pytest.fixture
def fresh_recovery_step():
    """`_recovery_step` traced anew (a patched attention must not leak into or out of its cache)."""
    analysis._recovery_step.clear_cache()
    yield
    analysis._recovery_step.clear_cache()


def test_a_model_attending_to_the_parents_recovers_the_dag(monkeypatch, fresh_recovery_step):
    spec, _, eval_set = spec_and_set("hybrid_special_token")
    forced = jnp.asarray(parent_rows(eval_set, counted_tokens(eval_set, spec)), jnp.float32)

    def attend_to_parents(query, key, mask):
        batch, _, heads, _ = query.shape
        return jnp.broadcast_to(forced[:, None], (batch, heads, *forced.shape[1:]))

    monkeypatch.setattr(model, "attention_probabilities", attend_to_parents)
    graphdef, params = random_state(tiny_config(vocab_size=spec.vocab_size), 2)
    metrics = analysis.dag_recovery(graphdef, params, eval_set, spec, batch_size=N_TASKS)
    assert len(metrics) == 4 * 2 * 4 + 4
    for name, value in metrics.items():
        assert value == pytest.approx(1.0, rel=1e-5), name


def test_dag_recovery_of_a_random_model(tmp_path):
    spec, _, eval_set = spec_and_set("hybrid_special_token")
    config = tiny_config(vocab_size=spec.vocab_size)
    graphdef, params = random_state(config, 3)
    metrics = analysis.dag_recovery(graphdef, params, eval_set, spec, batch_size=5)
    names = {
        f"{score}_{group}_{cell}"
        for score in ("parent_mass", "parent_top_m")
        for group in ("query", "demo")
        for cell in [f"L{layer}H{head}" for layer in range(2) for head in range(4)] + ["best"]
    }
    assert set(metrics) == names
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    for group in ("query", "demo"):
        cells = [v for k, v in metrics.items() if k.startswith(f"parent_mass_{group}_L")]
        assert metrics[f"parent_mass_{group}_best"] == max(cells)
    # Batch size and filler rows (12 tasks in batches of 5) do not change the result.
    again = analysis.dag_recovery(graphdef, params, eval_set, spec, batch_size=4)
    assert again == pytest.approx(metrics, rel=1e-5)
    # n_tasks takes a prefix.
    prefix = analysis.dag_recovery(graphdef, params, eval_set, spec, batch_size=5, n_tasks=5)
    first = {k: v[:5] for k, v in eval_set.items()}
    assert prefix == pytest.approx(
        analysis.dag_recovery(graphdef, params, first, spec, batch_size=5), rel=1e-6, nan_ok=True
    )
    standard = make_spec(prompt_strategy="standard")
    _, standard_set = world_and_eval_set(standard, N_TASKS)
    nothing = analysis.dag_recovery(graphdef, params, standard_set, standard, batch_size=5)
    assert set(nothing) == names and all(np.isnan(v) for v in nothing.values())

    # Figures.
    analysis.plot_dag_recovery_heatmap(metrics, tmp_path / "heat.png", which="demo")
    chosen = analysis.plot_query_attention(
        graphdef, params, eval_set, spec, tmp_path / "query.png", task=1
    )
    assert 0 <= chosen[0] < 2 and 0 <= chosen[1] < 4
    assert (
        analysis.plot_query_attention(
            graphdef, params, eval_set, spec, tmp_path / "l1.png", task=2, layer=1
        )[0]
        == 1
    )
    for name in ("heat.png", "query.png", "l1.png"):
        assert (tmp_path / name).stat().st_size > 1000


# --- embeddings ----------------------------------------------------------------------------------


def test_embedding_probe():
    rng = np.random.default_rng(0)
    V, usable, d, D = 160, 151, 6, 12
    E = rng.normal(0, 0.5, (V, d))
    reserved = np.zeros(V, bool)
    reserved[usable:] = True

    def probe(model_embeddings):
        garbage = np.where(reserved[:, None], 1e3 * rng.normal(size=model_embeddings.shape), 0.0)
        return analysis.embedding_probe(model_embeddings + garbage, E, usable)

    linear = probe(E @ rng.normal(size=(d, D)) * 0.02 + 0.3)  # full-rank map, plus a bias
    assert linear["embed_probe_r2"] > 1 - 1e-6
    square = probe(E @ rng.normal(size=(d, d)))  # an invertible one
    assert square["embed_probe_r2"] > 1 - 1e-6
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    assert probe(3.0 * E @ rotation)["embed_cka"] == pytest.approx(1.0, abs=1e-9)
    assert 0.0 < square["embed_cka"] < 1.0  # CKA is not invariant to general linear maps
    unrelated = probe(rng.normal(size=(V, D)))
    assert unrelated["embed_probe_r2"] < 0.2 and unrelated["embed_cka"] < 0.5


def test_embedding_probe_chooses_its_ridge():
    # Fewer ids than model dimensions (as on the quickstart: 64 ids, width 128), and a table that
    # holds E only faintly under noise: a near-unpenalised fit interpolates the noise.
    rng = np.random.default_rng(0)
    V, d, D = 64, 8, 128
    E = rng.normal(size=(V, d))

    def both(table):
        return (
            analysis.embedding_probe(table, E, V),
            analysis.embedding_probe(table, E, V, ridges=(1e-6,)),
        )

    noise = rng.normal(size=(V, D))
    chosen, fixed = both(0.05 * E @ rng.normal(size=(d, D)) + noise)
    assert fixed["embed_probe_ridge"] == 1e-6 and fixed["embed_probe_r2"] < -0.2
    assert chosen["embed_probe_ridge"] > 1e-6
    assert chosen["embed_probe_r2"] > max(fixed["embed_probe_r2"] + 0.2, -0.15)
    chosen, fixed = both(0.1 * E @ rng.normal(size=(d, D)) + noise)
    assert chosen["embed_probe_r2"] > max(fixed["embed_probe_r2"], 0.0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        analysis.embedding_probe(noise, E, 2)


def test_embedding_metrics_read_the_model_table():
    spec, world, _ = spec_and_set("hybrid_special_token")
    _, params = random_state(tiny_config(vocab_size=spec.vocab_size), 4)
    table = np.asarray(params["embed_tokens"].get_value())
    expected = analysis.embedding_probe(
        table, np.asarray(world["embeddings"]), spec.usable_vocab_size, holdout_fraction=0.3
    )
    assert analysis.embedding_metrics(params, world, spec, holdout_fraction=0.3) == expected


# --- token coverage --------------------------------------------------------------------------


def test_token_coverage_counts_distinct_chain_tokens():
    spec, world, eval_set = spec_and_set("cot")  # tasks 0..N_TASKS-1 of the seed's eval key
    brute = {int(token) for token in eval_set["chain"].ravel() if token >= 0}
    # Chunks of 5 tasks: the last one is padded with tasks beyond N_TASKS, which must not count.
    coverage = analysis.token_coverage(
        world, data.root_keys(0)["eval"], spec, N_TASKS, chunk_size=5
    )
    assert spec.usable_vocab_size == 16
    assert coverage == len(brute) / 16 and 0.0 < coverage < 1.0
    assert analysis.eval_set_coverage(eval_set, spec) == coverage
