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
