"""The TFDS builder (cotlab_jax.tfds_builder): array_record splits, read back without TF."""

import filecmp
import os

import numpy as np
import pytest
from test_train import tiny_config

from cotlab_jax import data, tfds_builder

pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    config = tiny_config("hybrid_special_token")
    return config, tfds_builder.build(config, str(tmp_path_factory.mktemp("tfds")), 16)


def sampled(config, n_train):
    """What the trainer's sampler and the frozen eval set produce for `config`."""
    spec = data.TaskSpec.from_config(config)
    keys = data.root_keys(config.seed)
    world = data.make_world(keys["world"], spec)
    batch_size = config.train.batch_size
    steps = [data.sample_batch(world, keys["train"], s, spec, batch_size)
             for s in range(n_train // batch_size)]
    train = {name: np.concatenate([np.asarray(b[name]) for b in steps]) for name in steps[0]}
    return spec, train, data.build_eval_set(world, keys["eval"], spec, config.eval.n_eval_tasks)


def assert_same(read, expected):
    assert set(read) == set(expected) | {"task_id"}
    np.testing.assert_array_equal(read["task_id"], np.arange(len(expected["k"])))
    for name, value in expected.items():
        assert read[name].dtype == value.dtype, name
        np.testing.assert_array_equal(read[name], value, err_msg=name)


def test_splits_read_back_equal_what_the_sampler_produced(built):
    config, path = built
    spec, train, eval_set = sampled(config, 16)
    assert 0 < eval_set["n_cot"].sum() < eval_set["k"].sum()  # hybrid: both forms present
    assert_same(tfds_builder.read_split(path, "train"), train)
    assert_same(tfds_builder.read_split(path, "test"), eval_set)
    assert_same(dict(tfds_builder.load_eval_set(path, spec), task_id=np.arange(24)), eval_set)
    with pytest.raises(ValueError, match="made from another task spec"):
        tfds_builder.load_eval_set(path, spec.with_changes(n_tasks=spec.n_tasks + 1))


def test_two_builds_are_identical(built, tmp_path):
    config, path = built
    again = tfds_builder.build(config, str(tmp_path), 16)
    assert os.path.basename(os.path.dirname(again)) == os.path.basename(os.path.dirname(path))
    records = sorted(name for name in os.listdir(path) if "array_record" in name)
    assert records == sorted(name for name in os.listdir(again) if "array_record" in name)
    assert len(records) == 2
    _, mismatch, errors = filecmp.cmpfiles(path, again, [*records, "features.json"], shallow=False)
    assert mismatch == errors == []


def test_features_are_documented_and_invalid_sizes_refused(built):
    import tensorflow_datasets as tfds

    _, path = built
    features = tfds.builder_from_directory(path).info.features
    assert all(features[name].doc.desc for name in features)
    assert str(tfds.builder_from_directory(path).info.version) == "1.0.0"
    with pytest.raises(ValueError, match=r"n_train_tasks=12: expected a positive multiple of "
                                         r"train.batch_size=8"):
        tfds_builder.CotIclConfig.from_run_config(tiny_config(), 12)


# SymbolicChats: the symbolic string tasks (DESIGN 1.7) as chats.

SYMBOLIC = dict(n_train=6, n_test=4, seed=3)


def symbolic_config():
    from cotlab_jax import symbolic

    # Mixed forms (recipe) and varying n, k, so padding and both answer forms are exercised.
    return symbolic.SymbolicConfig(n_input_choices=(3, 4), n_example_choices=(2, 5),
                                   initial_prob=0.3, final_prob=0.8, alpha=1.0)


@pytest.fixture(scope="module")
def built_symbolic(tmp_path_factory):
    return tfds_builder.build_symbolic(symbolic_config(), str(tmp_path_factory.mktemp("sym")),
                                       **SYMBOLIC)


def test_symbolic_splits_equal_sample_task_and_render_chat(built_symbolic):
    from cotlab_jax import symbolic

    config = symbolic_config()
    for split, seed, size in (("train", 3, 6), ("test", 1003, 4)):
        records = tfds_builder.read_symbolic_split(built_symbolic, split)
        assert [r["task_id"] for r in records] == list(range(size))
        for i, record in enumerate(records):
            task = symbolic.sample_task(seed, i, size, config)
            assert record["messages"] == symbolic.render_chat(task)
            assert record["answer"] == task.chain[-1][-1]
            assert record["messages"][-1]["content"].endswith(f"\\boxed{{{record['answer']}}}")
            assert (record["n"], record["m"], record["c"], record["k"]) == (
                task.n, task.m, task.c, task.k)
            assert record["is_cot"] == list(task.is_cot)
            assert record["n_cot"] == sum(task.is_cot)
            assert record["cot_prob"] == pytest.approx(task.cot_prob, rel=1e-6)
    # Both answer forms occur, and the train split is what write_jsonl writes.
    train = tfds_builder.read_symbolic_split(built_symbolic, "train")
    assert 0 < sum(r["n_cot"] for r in train) < sum(r["k"] for r in train)
    fields = tfds_builder.read_split(built_symbolic, "train")
    assert fields["is_cot"].shape == (6, 5) and fields["k"].dtype == np.int32
    assert isinstance(fields["messages"][0], str)


def test_symbolic_train_split_matches_write_jsonl(built_symbolic, tmp_path):
    import json

    from cotlab_jax import symbolic

    path = str(tmp_path / "chats.jsonl")
    symbolic.write_jsonl(path, SYMBOLIC["n_train"], SYMBOLIC["seed"], symbolic_config())
    with open(path) as f:
        chats = [json.loads(line) for line in f]
    assert chats == [r["messages"] for r in
                     tfds_builder.read_symbolic_split(built_symbolic, "train")]


def test_symbolic_two_builds_are_identical(built_symbolic, tmp_path):
    again = tfds_builder.build_symbolic(symbolic_config(), str(tmp_path), **SYMBOLIC)
    assert os.path.basename(os.path.dirname(again)) == os.path.basename(
        os.path.dirname(built_symbolic))
    records = sorted(name for name in os.listdir(built_symbolic) if "array_record" in name)
    assert records == sorted(name for name in os.listdir(again) if "array_record" in name)
    assert len(records) == 2
    _, mismatch, errors = filecmp.cmpfiles(built_symbolic, again, [*records, "features.json"],
                                           shallow=False)
    assert mismatch == errors == []
    other = tfds_builder.build_symbolic(symbolic_config(), str(tmp_path),
                                        **dict(SYMBOLIC, seed=4))
    assert other != again  # another seed is another config (and other records)


def test_symbolic_features_are_documented_and_invalid_configs_refused(built_symbolic):
    import json

    import tensorflow_datasets as tfds

    from cotlab_jax import symbolic

    info = tfds.builder_from_directory(built_symbolic).info
    expected = {"task_id", "messages", "answer", "n", "m", "c", "k", "is_cot", "n_cot",
                "cot_prob"}
    assert set(info.features) == expected
    assert all(info.features[name].doc.desc for name in info.features)
    assert str(info.version) == "1.0.0"
    assert json.loads(info.metadata["symbolic_config"])["n_example_choices"] == [2, 5]
    assert (info.metadata["seed"], info.metadata["test_seed"]) == (3, 1003)
    config = tfds_builder.SymbolicChatsConfig.create(symbolic_config(), 6, 4, 3)
    assert config.symbolic_config == symbolic_config()
    with pytest.raises(ValueError, match=r"n_test=0: expected a positive integer"):
        tfds_builder.SymbolicChatsConfig.create(symbolic.SymbolicConfig(), 6, 0)
    with pytest.raises(ValueError, match=r"expected a symbolic.SymbolicConfig"):
        tfds_builder.SymbolicChatsConfig.create(dict(), 6, 4)
