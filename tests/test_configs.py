"""Every shipped config validates, and the quickstart stays CPU-sized."""

import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from cotlab_jax import config as config_lib
from cotlab_jax import data, experiment, model, sweep

# configs/sweep.py takes a sweep's name; tests/test_sweep.py expands every one.
CONFIGS = sorted(path for path in glob.glob(
    os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if os.path.basename(path) != "sweep.py")


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates(path):
    config = load(path)
    for member in sweep.expand(config) if config.sweep.axes else [None]:
        member_config = config if member is None else member.config
        exp = experiment.setup(member_config)
        assert exp.total_steps >= 1
        assert config_lib.run_name(member_config).startswith(
            f"llama_L_{member_config.model.num_hidden_layers}_")


def test_default_is_the_reference():
    config = load(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
    exp = experiment.setup(config)
    assert exp.total_steps == 50_000 and config.train.batch_size == 64
    assert (config.train.lr, config.train.weight_decay) == (5e-5, 0.01)
    shapes = jax.eval_shape(lambda: model.init(exp.model_config, experiment.model_key(0))[1])
    assert round(model.count_params(shapes) / 1e6) == 245  # DESIGN 1.5


def test_quickstart_dag_is_the_documented_one():
    # configs/quickstart.py and the README explain its result by this DAG, drawn from seed 42:
    # y0 = g(x2, x0), y1 = g(x1, y0), y2 = y3 = g(x2, y1) (index n + j names chain token j).
    config = load(os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py"))
    member = sweep.expand(config)[0].config
    spec = data.TaskSpec.from_config(member)
    world = data.make_world(data.root_keys(member.seed)["world"], spec)
    parents = [set(row.tolist()) for row in np.asarray(world["fixed_adj"])]
    assert parents == [{2, 0}, {1, 3}, {2, 4}, {2, 4}]
    assert world["processor_pool"].shape[0] == 1
