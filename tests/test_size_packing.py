"""Size packing: members of different depth, heads, KV heads, head dimension, MLP and hidden
width run inside the largest shape give their own logits and decodes; pad -> unpad is exact; a
depth sweep evaluated size-packed (`evaluate --sweep`) equals evaluating each member alone."""

import dataclasses
import functools
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from cotlab_jax import (
    decode,
    evaluate,
    experiment,
    model,
    rundir,
    sharding,
    size_packing,
    sweep,
    sweep_eval,
)
from cotlab_jax.evaluate import cli as evaluate_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTH_SWEEP = os.path.join(ROOT, "tests", "configs", "tiny_depth_sweep.py")

BASE = model.LlamaConfig(
    vocab_size=32,
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    dtype="float32",
)
# The second member of each pair is bigger (or, for KV heads, groups its queries otherwise).
PADDINGS = {
    "depth": dict(num_hidden_layers=3),
    "heads": dict(num_attention_heads=8, num_key_value_heads=4),
    "kv_heads": dict(num_key_value_heads=1),  # 4 query heads per KV head against 2: copies
    "mlp": dict(intermediate_size=80),
    "hidden": dict(hidden_size=48),
    "head_dim": dict(head_dim=16),
}
EVERYTHING = dict(
    num_hidden_layers=3,
    hidden_size=40,
    intermediate_size=64,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=12,
)


def randomize(params, seed):
    """Fresh normal parameters everywhere (norm scales included), larger than the model's
    initialisation so every product matters; drawn by NumPy (nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda v: v.replace(jnp.asarray(0.3 * rng.standard_normal(v.shape), jnp.float32)),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def graphdef_of(config):
    return jax.eval_shape(functools.partial(model.init, config), jax.random.key(0))[0]


def random_params(config, seed):
    abstract = jax.eval_shape(functools.partial(model.init, config), jax.random.key(0))[1]
    return randomize(abstract, seed)


def inputs(members, batch=2, length=9, seed=5):
    ids = jax.random.randint(jax.random.key(seed), (members, batch, length), 0, BASE.vocab_size)
    mask = jnp.ones(ids.shape, bool).at[:, 0, :3].set(False)  # a left-padded row
    return ids, mask, model.positions_from_mask(mask)


def logits_tolerance(config: model.LlamaConfig, scale: float) -> float:
    """Packed and alone differ only in the order of float32 sums (zero-padded axes are longer,
    so XLA may block the reductions otherwise). A reordered sum of n terms moves by at most a
    few ulps of its largest partial sums, ~ sqrt(n) eps |terms| in practice; each layer has
    about 4 such sums in sequence on the residual stream, plus the head. Bound: eps x the
    longest contraction x (4 per layer + 1) x the logits' scale (a worst case, not typical)."""
    longest = max(config.hidden_size, config.intermediate_size, config.vocab_size)
    eps = float(np.finfo(np.float32).eps)
    return eps * np.sqrt(longest) * (4 * config.num_hidden_layers + 1) * scale * 4


def packed_and_alone_logits(configs):
    """Each member's logits from one size-packed program and from the member alone."""
    members = [(c, random_params(c, i)) for i, c in enumerate(configs)]
    pack = size_packing.pack(members)
    ids, mask, positions = inputs(len(members))
    packed = jax.jit(size_packing.apply, static_argnums=0)(
        pack.graphdef, pack.params, pack.sizes, ids, positions, mask
    )
    for i, (config, params) in enumerate(members):
        alone = jax.jit(model.apply, static_argnums=0)(
            graphdef_of(config), params, ids[i], positions[i], mask[i]
        )
        yield pack.config, packed[i], alone


def test_each_kind_of_padding_leaves_a_members_logits():
    # One pack of the base model and one member bigger in each size: the base is padded in
    # every kind at once, each other member in all but its own.
    kinds = ["none", *PADDINGS]
    configs = [BASE] + [dataclasses.replace(BASE, **PADDINGS[kind]) for kind in PADDINGS]
    for kind, (packed_config, packed, alone) in zip(
        kinds, packed_and_alone_logits(configs), strict=True
    ):
        tolerance = logits_tolerance(packed_config, float(jnp.abs(alone).max()))
        np.testing.assert_allclose(packed, alone, rtol=0, atol=tolerance, err_msg=kind)


def test_every_padding_at_once_in_the_cpu_formulation():
    # "auto" packs run the accelerator formulation (`packed_config`); "cpu" is kept.
    untied = dataclasses.replace(BASE, tie_word_embeddings=False, formulation="cpu")
    configs = [untied, dataclasses.replace(untied, **EVERYTHING)]
    for packed_config, packed, alone in packed_and_alone_logits(configs):
        assert packed_config.formulation == "cpu"
        tolerance = logits_tolerance(packed_config, float(jnp.abs(alone).max()))
        np.testing.assert_allclose(packed, alone, rtol=0, atol=tolerance)


def test_packed_config_and_kv_head_copies():
    wide = dataclasses.replace(BASE, num_attention_heads=6, num_key_value_heads=6)
    configs = [BASE, dataclasses.replace(BASE, num_key_value_heads=1), wide]
    packed = size_packing.packed_config(configs)
    # Query groups 2, 4 and 1: one query head per KV head, so 6 KV slots.
    assert (packed.num_attention_heads, packed.num_key_value_heads) == (6, 6)
    # The 4-group member's single KV head serves its 4 query heads from 4 copies.
    source, valid = size_packing.packed_sources("kv_heads", configs[1], packed)
    assert valid.tolist() == [True] * 4 + [False] * 2 and source[:4].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="model.rope_theta: size-packed members must share"):
        size_packing.packed_config([BASE, dataclasses.replace(BASE, rope_theta=1e4)])


def test_pad_then_unpad_is_exact_and_padding_is_zero():
    small = dataclasses.replace(BASE, num_key_value_heads=1, tie_word_embeddings=False)
    big = dataclasses.replace(BASE, **EVERYTHING, tie_word_embeddings=False)
    members = [(small, random_params(small, 0)), (big, random_params(big, 1))]
    pack = size_packing.pack(members)
    for i, (_, params) in enumerate(members):
        back = size_packing.member_params(pack, i)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
            assert a.shape == b.shape and np.array_equal(a, b)
    padded = jax.tree.map(lambda x: x[0], pack.params)
    attention = padded["layers"]["self_attn"]
    q, k = attention["q_proj"][...], attention["k_proj"][...]  # [L, D, heads, hd]
    layers, hidden, heads = small.num_hidden_layers, small.hidden_size, small.num_attention_heads
    half, packed_half = small.head_dim // 2, pack.config.head_dim // 2
    for w in (q, k):
        assert not np.any(w[layers:]) and not np.any(w[:, hidden:])
        assert not np.any(w[..., half:packed_half]) and not np.any(w[..., packed_half + half :])
    assert not np.any(q[:, :, heads:])
    # The member's one KV head, copied to the KV slots of its query heads (4 of 8 here).
    copies = heads // (pack.config.num_attention_heads // pack.config.num_key_value_heads)
    for slot in range(copies):
        np.testing.assert_array_equal(k[:, :, slot], k[:, :, 0])
    assert not np.any(k[:, :, copies:])
    assert not np.any(padded["layers"]["mlp"]["down_proj"][...][:, small.intermediate_size :])
    assert not np.any(padded["lm_head"][...][hidden:])


def test_packed_greedy_decoding_is_each_members_own():
    configs = [BASE, dataclasses.replace(BASE, **EVERYTHING)]
    members = [(c, random_params(c, i)) for i, c in enumerate(configs)]
    pack = size_packing.pack(members)
    ids, mask, _ = inputs(len(members), length=7, seed=9)

    @jax.jit
    def decode_packed(params, sizes, ids, mask):
        return jax.vmap(
            lambda p, s, i, m: decode.greedy_decode(pack.graphdef, p, i, m, 5, sizes=s)
        )(params, sizes, ids, mask)

    tokens, logits, _ = decode_packed(pack.params, pack.sizes, ids, mask)
    for i, (config, params) in enumerate(members):
        graphdef = graphdef_of(config)
        own_tokens, own_logits, _ = decode.greedy_decode(graphdef, params, ids[i], mask[i], 5)
        np.testing.assert_array_equal(tokens[i], own_tokens)
        scale = float(jnp.abs(own_logits).max())
        np.testing.assert_allclose(
            logits[i], own_logits, rtol=0, atol=logits_tolerance(pack.config, scale)
        )


def load_depth_sweep():
    spec = importlib.util.spec_from_file_location("tiny_depth_sweep", DEPTH_SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def files_of(directory):
    return {
        os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _, names in os.walk(directory)
        for name in names
    }


@pytest.fixture(scope="module")
def depth_sweep_dir(tmp_path_factory):
    """The tiny depth {1, 2} sweep's directory, whose members hold a checkpoint of fresh
    random weights (no training: evaluation only needs the run files)."""
    config = load_depth_sweep()
    workdir = str(tmp_path_factory.mktemp("size_sweep"))
    members = sweep.expand(config)
    sweep.write_index(config, members, workdir)
    mesh = sharding.make_mesh({}, devices=jax.local_devices()[:1])
    for member in members:
        run_dir = os.path.join(workdir, member.name)
        exp = experiment.setup(member.config, mesh)
        rundir.prepare_workdir(run_dir, member.config)
        # The whole train state from NumPy (nothing to compile): random weights, zero rest.
        _, abstract = experiment.abstract_state(exp)
        state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
        state["params"] = randomize(abstract["params"], member.index)
        manager = rundir.checkpoint_manager(run_dir, 1)
        manager.save(1, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        manager.close()
        rundir.frozen_eval_set(run_dir, exp)
    return workdir


def test_the_plan_names_the_size_packed_evaluation_programs():
    config = load_depth_sweep()
    config.sweep.axes = (*config.sweep.axes, ("data.prompt_strategy", ("cot", "standard")))
    members = sweep.expand(config)
    packs = sweep.plan(members, {m.index: 0 for m in members}, "size")
    assert sorted(sorted(m.index for m in p) for p in packs) == [[0, 1], [2, 3]]
    assert [[m.index for m in g] for g in sweep.evaluation_groups(members)] == [[0, 2], [1, 3]]
    lines = sweep.describe_plan(packs, "size", members)
    assert any("members [0, 2]" in line and "num_hidden_layers" in line for line in lines)


def test_a_depth_sweep_evaluated_size_packed_equals_each_member_alone(depth_sweep_dir):
    before = files_of(depth_sweep_dir)
    result = sweep_eval.evaluate_sweep(depth_sweep_dir, example_counts="1,3,4")
    assert files_of(depth_sweep_dir) == before  # read-only
    # One program for the task shape: both depths.
    assert [p["members"] for p in result["programs"]] == [[0, 1]]
    with open(os.path.join(depth_sweep_dir, "sweep.json")) as f:
        dirs = [m["dir"] for m in json.load(f)["members"]]
    for member, name in zip(result["members"], dirs, strict=True):
        run = rundir.load_run(os.path.join(depth_sweep_dir, name))
        eval_set = rundir.read_eval_set(
            os.path.join(depth_sweep_dir, name, "eval_set.npz"), run.spec
        )
        options = dict(
            batch_size=run.config.eval.batch_size,
            max_pred_tokens=run.config.eval.max_pred_tokens,
            answer_rule="reference",
        )
        by_k = evaluate.evaluate_over_k(
            run.graphdef, run.params, eval_set, run.spec, example_counts=[1, 3, 4], **options
        )
        # K' = K = 4 keeps every example: it is `evaluate` itself (test_evaluate_over_k.py).
        pairs = [(member["metrics"], by_k[4])] + [
            (member["metrics_by_k"][str(k)], by_k[k]) for k in (1, 3, 4)
        ]
        for packed_metrics, own in pairs:
            assert packed_metrics.keys() == own.keys()
            for name, value in own.items():
                if "acc" in name:  # greedy tokens: the same argmax
                    assert packed_metrics[name] == value, name
                else:  # cross-entropies of logits equal to float32 rounding
                    assert packed_metrics[name] == pytest.approx(value, rel=1e-5), name


def test_sweep_evaluation_refuses_to_write_into_the_sweep(depth_sweep_dir):
    out = os.path.join(depth_sweep_dir, "result.json")
    with pytest.raises(SystemExit, match="never writes into"):
        evaluate_cli.run_sweep_cli(depth_sweep_dir, "latest", out, answer_rule="reference")
    assert not os.path.exists(out)


def test_a_finished_size_packed_sweep_writes_its_evaluation(depth_sweep_dir, tmp_path):
    # A copy of the sweep whose members count as finished: `sweep.run` trains nothing, writes
    # the report and, with sweep.packing="size", the size-packed evaluation.
    workdir = str(tmp_path / "sweep")
    shutil.copytree(depth_sweep_dir, workdir)
    config = load_depth_sweep()
    for member in sweep.expand(config):
        total = config.train.n_tasks // config.train.batch_size
        rundir.write_json(os.path.join(workdir, member.name, "results.json"), dict(step=total))
    result = sweep.run(config, workdir)
    assert [status for _, status in result["members"]] == ["finished", "finished"]
    with open(os.path.join(workdir, sweep.SIZE_PACKED_EVAL)) as f:
        written = json.load(f)
    expected = sweep_eval.evaluate_sweep(depth_sweep_dir, example_counts="all")
    assert written["programs"] == expected["programs"]
    # The same programs on the same inputs: the same numbers (JSON keeps floats exactly).
    assert written["members"] == expected["members"]


def test_a_masked_layer_is_the_identity_whatever_it_holds():
    """The layer mask, not zero padding, makes a padded layer the identity: random weights in
    the shallow member's padded layer leave its logits as they were alone."""
    shallow = dataclasses.replace(BASE, num_hidden_layers=1)
    configs = [shallow, dataclasses.replace(BASE, num_hidden_layers=2)]
    members = [(c, random_params(c, i)) for i, c in enumerate(configs)]
    pack = size_packing.pack(members)
    rng = np.random.default_rng(11)

    def fill_padded_layer(path, leaf):
        if "layers" not in jax.tree_util.keystr(path):
            return leaf
        return leaf.at[0, 1].set(jnp.asarray(rng.standard_normal(leaf.shape[2:]), leaf.dtype))

    params = jax.tree_util.tree_map_with_path(fill_padded_layer, pack.params)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, pack.params))
    ids, mask, positions = inputs(len(members))
    packed = jax.jit(size_packing.apply, static_argnums=0)(
        pack.graphdef, params, pack.sizes, ids, positions, mask
    )
    alone = jax.jit(model.apply, static_argnums=0)(
        graphdef_of(shallow), members[0][1], ids[0], positions[0], mask[0]
    )
    tolerance = logits_tolerance(pack.config, float(jnp.abs(alone).max()))
    np.testing.assert_allclose(packed[0], alone, rtol=0, atol=tolerance)
