"""The JAX sampler against the NumPy oracle of docs/tasks.md sections 1-3
(cotlab_jax/numpy_reference.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_helpers import RECIPE, task_spec
from scipy import stats

from cotlab_jax import config as config_lib
from cotlab_jax import data
from cotlab_jax import numpy_reference as oracle

STRATEGIES = config_lib.PROMPT_STRATEGIES


def make_spec(**data_fields) -> data.TaskSpec:
    return task_spec(**{**dict(vocab_size=48, n_dims=6, n_example_choices=(6,)), **data_fields})


@functools.cache
def sampled(spec: data.TaskSpec, n_tasks: int = 32, seed: int = 0):
    """(world, latents, tasks) as NumPy, for tasks drawn by the public batch sampler."""
    keys = data.root_keys(seed)
    world = data.make_world(keys["world"], spec)
    tasks = data.sample_batch(world, keys["train"], 3, spec, n_tasks)
    # The same per-task keys sample_batch uses, to read the latents it drew.
    task_keys = data.task_keys(jax.random.fold_in(keys["train"], 3), jnp.arange(n_tasks))
    latents = jax.vmap(data.sample_latents, (0, 0, None, None, None, None))(
        task_keys, jnp.arange(n_tasks), spec.n_tasks, True, world, spec
    )
    return (
        jax.tree.map(np.asarray, world),
        jax.tree.map(np.asarray, latents),
        jax.tree.map(np.asarray, tasks),
    )


def reserved_ids(spec):
    return list(range(spec.usable_vocab_size, spec.vocab_size))


# --- chain tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", config_lib.ACTIVATIONS)
@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("special", [False, True])
def test_chain_tokens_match_oracle(activation, n_layers, special):
    rng = np.random.default_rng([config_lib.ACTIVATIONS.index(activation), n_layers, special])
    V, d, K, N, M, C = 96, 8, 16, 5, 3, 4
    n_reserved = 9 if special else 0
    E = rng.normal(size=(V, d)).astype(np.float32)
    n_tasks = 6
    processors = rng.normal(size=(n_tasks, C, n_layers, d, d)).astype(np.float32)
    n = rng.integers(M, N + 1, size=n_tasks)
    adj = np.stack(
        [
            np.stack([rng.choice(n[t] + j, size=M, replace=False) for j in range(C)])
            for t in range(n_tasks)
        ]
    ).astype(np.int32)
    inputs = rng.integers(0, V - n_reserved, size=(n_tasks, K, N)).astype(np.int32)
    forbidden = np.arange(V) >= V - n_reserved

    fn = jax.jit(
        jax.vmap(data.chain_tokens, (None, 0, 0, None, 0, 0, None, None)), static_argnums=6
    )
    got = np.asarray(
        fn(E, processors, adj, np.ones((C, M), bool), inputs, n, activation, forbidden)
    )
    for t in range(n_tasks):
        for e in range(K):
            want = oracle.chain(
                E,
                processors[t],
                adj[t],
                n[t],
                M,
                C,
                inputs[t, e],
                activation,
                reserved=range(V - n_reserved, V),
            )
            np.testing.assert_array_equal(got[t, e], want, err_msg=f"task {t} example {e}")


def test_nearest_token_breaks_ties_to_lowest_allowed_id():
    E = np.zeros((12, 3), np.float32)
    E[[2, 5, 7]] = [1.0, 0.0, 0.0]  # three exact ties
    E[0] = [-1.0, 0.0, 0.0]
    x = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    forbidden = np.zeros(12, bool)
    np.testing.assert_array_equal(data.nearest_token(x, E, forbidden), [2, 0])
    forbidden[[0, 2]] = True
    np.testing.assert_array_equal(data.nearest_token(x, E, forbidden), [5, 1])
    # Under vmap, with the table shared or per member, the same answers.
    xs = np.stack([x, x[::-1]])
    np.testing.assert_array_equal(
        jax.vmap(data.nearest_token, (0, None, None))(xs, E, forbidden), [[5, 1], [1, 5]]
    )
    np.testing.assert_array_equal(
        jax.vmap(data.nearest_token, (0, 0, None))(xs, np.stack([E, E]), forbidden),
        [[5, 1], [1, 5]],
    )


@pytest.mark.parametrize("strategy", ["cot", "hybrid_special_token"])
def test_sampled_chain_tokens_match_oracle(strategy):
    spec = make_spec(
        prompt_strategy=strategy,
        n_input_choices=(2, 3, 4),
        n_parent_choices=(1, 2, 3),
        chain_length_choices=(1, 2, 3),
        n_example_choices=(2, 4, 6),
        H_num_layers=2,
        activation="silu",
    )
    world, lat, tasks = sampled(spec)
    reserved = reserved_ids(spec)
    for t in range(len(lat["n"])):
        n, m, c, k = (int(lat[f][t]) for f in "nmck")
        for e in range(k):
            want = oracle.chain(
                world["embeddings"],
                lat["processors"][t],
                lat["adj"][t],
                n,
                m,
                c,
                lat["inputs"][t, e],
                spec.activation,
                reserved,
            )
            np.testing.assert_array_equal(tasks["chain"][t, e, :c], want)
            np.testing.assert_array_equal(tasks["inputs"][t, e, :n], lat["inputs"][t, e, :n])
        assert (tasks["chain"][t, :, c:] == -1).all() and (tasks["chain"][t, k:] == -1).all()


# --- prompt layouts -----------------------------------------------------------------------------


# Variable n, c, k are masked; one choice of each (the reference's default shape) takes the
# static layout of `spec.fixed_shape` (except under the hybrid strategy's per-example forms).
SHAPES = dict(
    variable=dict(
        n_input_choices=(2, 3, 4),
        n_parent_choices=(1, 2, 3),
        chain_length_choices=(1, 2, 3),
        n_example_choices=(1, 3, 6),
    ),
    fixed=dict(
        n_input_choices=(3,),
        n_parent_choices=(2,),
        chain_length_choices=(3,),
        n_example_choices=(5,),
    ),
)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layout_matches_oracle_token_for_token(strategy, shape):
    spec = make_spec(prompt_strategy=strategy, **SHAPES[shape])
    assert spec.fixed_shape == (shape == "fixed" and strategy != "hybrid_special_token")
    _, _, tasks = sampled(spec)
    pad = spec.token_id("pad")
    for t in range(len(tasks["n"])):
        n, c, k = (int(tasks[f][t]) for f in "nck")
        examples = [
            (list(tasks["inputs"][t, e, :n]), list(tasks["chain"][t, e, :c])) for e in range(k)
        ]
        tokens, labels, query, target = oracle.prompt(
            strategy, examples, tasks["is_cot"][t], spec.vocab_size
        )
        ids, mask, positions = oracle.left_pad(tokens, spec.seq_len, pad)
        np.testing.assert_array_equal(tasks["input_ids"][t], ids)
        np.testing.assert_array_equal(tasks["attention_mask"][t], mask)
        np.testing.assert_array_equal(tasks["positions"][t], positions)
        np.testing.assert_array_equal(
            tasks["labels"][t], oracle.left_pad(labels, spec.seq_len, oracle.IGNORE)[0]
        )
        q_ids, q_mask, q_positions = oracle.left_pad(query, spec.query_len, pad)
        np.testing.assert_array_equal(tasks["query_ids"][t], q_ids)
        np.testing.assert_array_equal(tasks["query_mask"][t], q_mask)
        np.testing.assert_array_equal(tasks["query_positions"][t], q_positions)
        padded_target = target + [oracle.IGNORE] * (spec.target_len - len(target))
        np.testing.assert_array_equal(tasks["target_ids"][t], padded_target)
        n_cot = int(tasks["is_cot"][t, :k].sum())
        assert (tasks["n_cot"][t], tasks["n_direct"][t]) == (n_cot, k - n_cot)
        assert not tasks["is_cot"][t, k:].any()


@pytest.mark.parametrize("shape", SHAPES)
def test_fixed_shape_lays_out_by_a_static_gather(shape):
    # The layout of a fixed shape is a static gather; variable shapes pack by cumsum and scatter.
    spec = make_spec(prompt_strategy="cot_special_token", **SHAPES[shape])
    world = data.make_world(data.root_keys(0)["world"], spec)
    ids = jnp.arange(4)
    layout = jax.make_jaxpr(lambda w, k: data.sample_tasks(k, ids, 8, False, w, spec))(
        world, data.task_keys(jax.random.key(0), ids)
    )
    assert ("cumsum" in str(layout)) == (shape == "variable")


def test_static_lengths_are_tight():
    """With one choice per field, the longest sequence fills seq_len exactly."""
    for strategy in STRATEGIES:
        spec = make_spec(prompt_strategy=strategy, chain_length_choices=(3,))
        if strategy == "hybrid_special_token":
            spec = spec.with_changes(recipe=(1.0, 1.0, 0.0, 0.0))  # all CoT
        _, _, tasks = sampled(spec, n_tasks=4)
        assert tasks["attention_mask"].all(), strategy
        assert tasks["query_mask"].all(), strategy
        assert (tasks["target_ids"] != -100).all(), strategy


# --- the task distribution ----------------------------------------------------------------------


def test_dag_validity():
    spec = make_spec(
        n_input_choices=(2, 3, 5), n_parent_choices=(1, 3, 4), chain_length_choices=(2, 4)
    )
    _, lat, tasks = sampled(spec, n_tasks=64)
    assert (tasks["m"] == np.minimum(tasks["m"], tasks["n"])).all()
    for t in range(64):
        n, m, c = (int(tasks[f][t]) for f in "nmc")
        for j in range(spec.C):
            row = tasks["adj"][t, j]
            if j >= c:
                assert (row == -1).all() and not tasks["parent_mask"][t, j].any()
                continue
            parents = row[:m]
            assert len(set(parents)) == m, row
            assert ((parents >= 0) & (parents < n + j)).all(), (row, n, j)
            assert (row[m:] == -1).all()


def test_fixed_dag_is_shared_by_every_task():
    spec = make_spec(
        ablation_fixed_dag=True,
        n_input_choices=(4,),
        n_parent_choices=(2,),
        chain_length_choices=(3,),
    )
    world, _, tasks = sampled(spec, n_tasks=16)
    assert (tasks["adj"] == tasks["adj"][0]).all()
    np.testing.assert_array_equal(tasks["adj"][0], world["fixed_adj"])
    eval_tasks = data.eval_tasks(world, data.root_keys(0)["eval"], jnp.arange(8), spec, 8)
    assert (np.asarray(eval_tasks["adj"]) == tasks["adj"][0]).all()
    free = sampled(
        make_spec(n_input_choices=(4,), n_parent_choices=(2,), chain_length_choices=(3,)),
        n_tasks=16,
    )[2]
    assert len(np.unique(free["adj"].reshape(16, -1), axis=0)) > 8


def test_processor_pool():
    spec = make_spec(ablation_fixed_H=True, num_unique_H=3)
    world, lat, _ = sampled(spec, n_tasks=32)
    pool = world["processor_pool"]
    assert pool.shape == (3, spec.H_num_layers, spec.n_dims, spec.n_dims)
    matches = (lat["processors"][:, :, None] == pool[None, None]).all(axis=(-1, -2, -3))
    assert (matches.sum(-1) == 1).all()  # every chain index uses exactly one pool member
    assert len(np.unique(matches.argmax(-1))) == 3
    fresh = sampled(make_spec(chain_length_choices=(4,)), n_tasks=8)[1]["processors"]
    assert len(np.unique(fresh.reshape(-1, fresh.shape[-1] ** 2), axis=0)) == fresh.shape[0] * 4


@pytest.mark.parametrize("strategy", ["standard_special_token", "hybrid_special_token"])
def test_reserved_ids_never_inputs_or_chain_tokens(strategy):
    spec = make_spec(prompt_strategy=strategy, vocab_size=16, n_dims=3)  # many near-reserved wins
    _, _, tasks = sampled(spec, n_tasks=64)
    for field in ("inputs", "chain"):
        values = tasks[field][tasks[field] >= 0]
        assert values.max() < spec.usable_vocab_size, field


def test_parent_choice_and_input_tokens_are_uniform():
    spec = make_spec(
        n_input_choices=(4,),
        n_parent_choices=(1,),
        chain_length_choices=(2,),
        n_example_choices=(8,),
        vocab_size=32,
    )
    _, _, tasks = sampled(spec, n_tasks=2048, seed=7)
    for j, n_available in enumerate([4, 5]):
        counts = np.bincount(tasks["adj"][:, j, 0], minlength=n_available)
        assert stats.chisquare(counts).pvalue > 1e-3, counts
    counts = np.bincount(tasks["inputs"].ravel(), minlength=32)
    assert stats.chisquare(counts).pvalue > 1e-3, counts
    spec = make_spec(n_input_choices=(2, 3, 4), n_example_choices=(1, 5))
    _, _, tasks = sampled(spec, n_tasks=2048, seed=8)
    assert stats.chisquare(np.bincount(tasks["n"])[2:]).pvalue > 1e-3
    assert stats.chisquare(np.bincount(tasks["k"])[[1, 5]]).pvalue > 1e-3


# --- the CoT-probability recipe -----------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0, float("inf")])
def test_recipe_values(alpha):
    spec = make_spec(prompt_strategy="hybrid_special_token").with_changes(
        recipe=(0.1, 0.9, alpha, 1.0)
    )
    n_prompts = 1000
    index = np.array([0, 1, 250, 500, 999, 1000])
    got = np.asarray(data.recipe_cot_prob(spec, jnp.asarray(index / n_prompts, jnp.float32)))
    want = [oracle.power_law(0.1, 0.9, alpha, 1.0, i, n_prompts) for i in index]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_hybrid_cot_fraction_follows_the_recipe():
    spec = make_spec(prompt_strategy="hybrid_special_token", n_example_choices=(20,))
    # Eval tasks take the recipe index in order: task i has p = i / n.
    keys = data.root_keys(0)
    world = data.make_world(keys["world"], spec)
    tasks = data.eval_tasks(world, keys["eval"], jnp.arange(512), spec, 512)
    p = np.arange(512) / 512
    np.testing.assert_allclose(tasks["cot_prob"], p, atol=1e-6)
    fraction = tasks["n_cot"] / 20
    assert abs(fraction.mean() - p.mean()) < 0.02
    assert np.corrcoef(fraction, p)[0, 1] > 0.9
    # Shuffled training draws the index uniformly: p is uniform on [0, 1) under alpha = 1.
    _, _, train = sampled(spec, n_tasks=1024)
    assert stats.kstest(train["cot_prob"], "uniform").pvalue > 1e-3
    # Curriculum: the index is the task's position in training order.
    curriculum = spec.with_changes(recipe_order="curriculum")
    batch = data.sample_batch(world, keys["train"], 5, curriculum, 16)
    np.testing.assert_allclose(
        batch["cot_prob"], (5 * 16 + np.arange(16)) / spec.n_tasks, rtol=1e-6
    )
    # alpha = 0: all CoT; alpha = inf: none (but at the very last index).
    for alpha, want in [(0.0, 20), (float("inf"), 0)]:
        extreme = spec.with_changes(recipe=(0.0, 1.0, alpha, 1.0))
        _, _, tasks = sampled(extreme, n_tasks=64)
        assert (tasks["n_cot"] == want).all()


# --- reproducibility ----------------------------------------------------------------------------


def test_same_batch_on_one_and_eight_devices():
    spec = make_spec(
        prompt_strategy="hybrid_special_token", n_input_choices=(3, 4), chain_length_choices=(2, 3)
    )
    keys = data.root_keys(0)
    world = data.make_world(keys["world"], spec)
    one = data.sample_batch(world, keys["train"], 11, spec, 16)
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    sharded_fn = jax.jit(
        data.sample_batch.__wrapped__,
        static_argnames=("spec", "batch_size"),
        out_shardings=jax.sharding.NamedSharding(mesh, jax.P("data")),
    )
    eight = sharded_fn(world, keys["train"], 11, spec=spec, batch_size=16)
    assert len(eight["input_ids"].sharding.device_set) == 8
    for name in one:
        np.testing.assert_array_equal(np.asarray(one[name]), np.asarray(eight[name]), name)


def test_eval_set_is_independent_of_chunking_and_round_trips(tmp_path):
    spec = make_spec(prompt_strategy="cot_special_token", n_input_choices=(2, 3))
    keys = data.root_keys(3)
    world = data.make_world(keys["world"], spec)
    a = data.build_eval_set(world, keys["eval"], spec, 40, chunk_size=16)
    b = data.build_eval_set(world, keys["eval"], spec, 40, chunk_size=64)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], name)
    path = str(tmp_path / "eval_set.npz")
    data.save_eval_set(path, a, spec)
    loaded = data.load_eval_set(path, spec)
    assert loaded.keys() == a.keys()
    for name in a:
        np.testing.assert_array_equal(loaded[name], a[name])
    with pytest.raises(ValueError, match="another task spec"):
        data.load_eval_set(path, spec.with_changes(vocab_size=64))
    # Training-only fields (a longer run, another recipe order) keep the same eval set.
    data.load_eval_set(path, spec.with_changes(n_tasks=5 * spec.n_tasks, recipe_order="curriculum"))
    # Train and eval tasks differ (eval comes from seed + 1000) but share the world.
    train = data.sample_batch(world, keys["train"], 0, spec, 40)
    assert not np.array_equal(np.asarray(train["inputs"]), a["inputs"])


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_input_choices", (), "data.n_input_choices=() is invalid: expected a non-empty tuple"),
        ("n_parent_choices", (2, 0), "data.n_parent_choices=(2, 0) is invalid"),
        ("chain_length_choices", (1.5,), "data.chain_length_choices=(1.5,) is invalid"),
        ("activation", "gelu", "data.activation='gelu' is invalid: expected one of"),
        ("prompt_strategy", "cot_please", "data.prompt_strategy='cot_please' is invalid"),
        ("num_unique_H", 5, "needs data.ablation_fixed_H=True"),
        ("n_dims", 0, "data.n_dims=0 is invalid: expected a positive integer"),
        ("data_initializer_range", -1.0, "expected a positive number"),
    ],
)
def test_invalid_data_fields_are_named(field, value, message):
    config = config_lib.get_base_config()
    config.data[field] = value
    with pytest.raises(
        config_lib.ConfigError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace(".", r"\.")
        .replace("[", r"\["),
    ):
        data.TaskSpec.from_config(config)


def test_invalid_combinations_are_named():
    def check(message, **fields):
        config = config_lib.get_base_config()
        config.data.update(fields)
        with pytest.raises(config_lib.ConfigError, match=message):
            data.TaskSpec.from_config(config)

    check(
        r"data\.vocab_size=10 .*reserves 9 ids.*>= 11",
        vocab_size=10,
        prompt_strategy="cot_special_token",
    )
    check(r"data\.num_unique_H=-1 .*positive integer", ablation_fixed_H=True)
    check(r"needs a recipe", prompt_strategy="hybrid_special_token")
    check(
        r"alpha=-1\.0 .*alpha >= 0",
        prompt_strategy="hybrid_special_token",
        cot_example_prob_recipe_info={**RECIPE, "alpha": -1.0},
    )
    check(
        r"type='linear' .*expected one of",
        prompt_strategy="hybrid_special_token",
        cot_example_prob_recipe_info={**RECIPE, "type": "linear"},
    )
    check(
        r"applies only to prompt_strategy 'hybrid_special_token'",
        cot_example_prob_recipe_info=RECIPE,
    )
    check(
        r"data\.n_input_choices=\(3, 4\) .*single choice",
        ablation_fixed_dag=True,
        n_input_choices=(3, 4),
    )
    check(r"cot_example_prob_recipe_order='random'", cot_example_prob_recipe_order="random")
