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
    steps = [
        data.sample_batch(world, keys["train"], s, spec, batch_size)
        for s in range(n_train // batch_size)
    ]
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
    with pytest.raises(
        ValueError,
        match=r"n_train_tasks=12: expected a positive multiple of "
        r"train.batch_size=8",
    ):
        tfds_builder.CotIclConfig.from_run_config(tiny_config(), 12)


# SymbolicChats: the symbolic string tasks (cotlab_jax.symbolic) as rendered chats.

SYMBOLIC = dict(n_train=6, n_test=4, seed=3)


def symbolic_configs():
    from cotlab_jax import symbolic

    # Varying n, c and k with a recipe: padding and both answer forms are exercised, and some
    # tasks store fewer examples (2) than a chat shows (3).
    config = symbolic.SymbolicConfig(
        n_input_choices=(3, 4), chain_length_choices=(1, 3), n_example_choices=(2, 5)
    )
    render = symbolic.RenderConfig(
        examples_per_prompt=3, initial_prob=0.3, final_prob=0.8, alpha=1.0
    )
    return config, render


@pytest.fixture(scope="module")
def built_symbolic(tmp_path_factory):
    return tfds_builder.build_symbolic(
        *symbolic_configs(), str(tmp_path_factory.mktemp("sym")), **SYMBOLIC
    )


def test_symbolic_splits_equal_the_jsonl_rows(built_symbolic, tmp_path):
    import json

    from cotlab_jax import symbolic

    splits = symbolic.render_splits(3, 6, 4, *symbolic_configs())
    for split, ids in (("train", range(6)), ("test", range(6, 10))):
        path = str(tmp_path / f"{split}.jsonl")
        symbolic.write_jsonl(path, splits[split])
        with open(path) as f:
            expected = [json.loads(line) for line in f]
        records = tfds_builder.read_symbolic_split(built_symbolic, split)
        assert sorted(r["task_id"] for r in records) == list(ids)
        assert [r["cot_example_prob"] for r in records] == pytest.approx(
            [r["cot_example_prob"] for r in expected], rel=1e-6
        )
        strip = lambda row: {k: v for k, v in row.items() if k != "cot_example_prob"}
        assert [strip(r) for r in records] == [strip(r) for r in expected]
    fields = tfds_builder.read_split(built_symbolic, "train")
    train = tfds_builder.read_symbolic_split(built_symbolic, "train")
    assert 0 < fields["n_cot"].sum() < fields["n_rendered"].sum()
    assert set(fields["k"]) == {2, 5} and set(fields["c"]) == {1, 3}
    assert fields["input_words"].shape == (6, 5, 4) and fields["adj_list"].shape == (6, 5, 3, 2)
    assert fields["intermediate_words"].shape == (6, 5, 2)
    assert isinstance(fields["answer_word"][0, 0], str) and fields["k"].dtype == np.int32
    for i, row in enumerate(train):
        last = row["examples"][len(row["is_cot"]) - 1]
        assert fields["answer"][i] == last["answer_word"]
        assert row["messages"][-1]["content"].endswith(f"\\boxed{{{last['answer_word']}}}")
        assert fields["n_rendered"][i] == min(3, fields["k"][i])
        assert (fields["input_words"][i, fields["k"][i] :] == "").all()
        assert (fields["adj_list"][i, :, fields["c"][i] :] == -1).all()


def test_symbolic_two_builds_are_identical(built_symbolic, tmp_path):
    again = tfds_builder.build_symbolic(*symbolic_configs(), str(tmp_path), **SYMBOLIC)
    assert os.path.basename(os.path.dirname(again)) == os.path.basename(
        os.path.dirname(built_symbolic)
    )
    records = sorted(name for name in os.listdir(built_symbolic) if "array_record" in name)
    assert records == sorted(name for name in os.listdir(again) if "array_record" in name)
    assert len(records) == 2
    _, mismatch, errors = filecmp.cmpfiles(
        built_symbolic, again, [*records, "features.json"], shallow=False
    )
    assert mismatch == errors == []
    other = tfds_builder.build_symbolic(
        *symbolic_configs(), str(tmp_path), **dict(SYMBOLIC, seed=4)
    )
    assert other != again  # another seed is another config (and other records)


def test_symbolic_features_are_documented_and_invalid_configs_refused(built_symbolic):
    import json

    import tensorflow_datasets as tfds

    from cotlab_jax import symbolic

    info = tfds.builder_from_directory(built_symbolic).info
    expected = {
        "task_id",
        "input_words",
        "intermediate_words",
        "answer_word",
        "adj_list",
        "n",
        "m",
        "c",
        "k",
        "messages",
        "text",
        "answer",
        "n_rendered",
        "is_cot",
        "n_cot",
        "cot_example_prob",
    }
    assert set(info.features) == expected
    assert all(info.features[name].doc.desc for name in info.features)
    assert str(info.version) == "2.0.0"
    assert json.loads(info.metadata["symbolic_config"])["n_example_choices"] == [2, 5]
    assert json.loads(info.metadata["render_config"])["examples_per_prompt"] == 3
    assert info.metadata["seed"] == 3
    assert info.metadata["task_ids"] == {"train": [0, 6], "test": [6, 10]}
    config, render = symbolic_configs()
    created = tfds_builder.SymbolicChatsConfig.create(config, render, 6, 4, 3)
    assert (created.symbolic_config, created.render_config) == (config, render)
    with pytest.raises(ValueError, match=r"n_test_tasks=0: expected a positive integer"):
        tfds_builder.SymbolicChatsConfig.create(config, render, 6, 0)
    with pytest.raises(ValueError, match=r"expected a symbolic.SymbolicConfig"):
        tfds_builder.SymbolicChatsConfig.create(dict(), render, 6, 4)
    with pytest.raises(ValueError, match=r"examples_per_prompt=6: expected at most the examples"):
        tfds_builder.SymbolicChatsConfig.create(
            config, symbolic.RenderConfig(examples_per_prompt=6), 6, 4
        )


def test_symbolic_command_line_refuses_bad_flags_in_one_line(tmp_path):
    import subprocess
    import sys

    from test_train import ROOT

    args = [
        sys.executable,
        "-m",
        "cotlab_jax.tfds_builder",
        "--symbolic",
        f"--data_dir={tmp_path}",
        "--n_train_tasks=2",
        "--n_test_tasks=1",
        "--n_inputs=3,5",
        "--n_parents=4",
    ]
    bad = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (bad.returncode, bad.stderr.strip()) == (
        1,
        (
            "symbolic.n_parent_choices=(4,): expected parents per chain word m <= "
            "input words n for "
            "every draw (the smallest n choice is 3)"
        ),
    )
    assert not list(tmp_path.iterdir())
