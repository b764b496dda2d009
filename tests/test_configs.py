"""Every shipped config validates, and the quickstart stays CPU-sized; a config file that fails
to load, or an override of a swept field, ends the main command in one line."""

import glob
import importlib.util
import os
import subprocess
import sys

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


ROOT = os.path.join(os.path.dirname(__file__), "..")


def run_main(*flags):
    return subprocess.run([sys.executable, "-m", "cotlab_jax.main", *flags], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)


def test_a_config_file_that_fails_to_load_is_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    raise KeyError(f'no sweep {arg!r}')\n")
    result = run_main(f"--config={broken}:x", f"--workdir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: flag --config={broken}:x: KeyError: \"no sweep 'x'\""]
    missing = run_main(f"--config={tmp_path / 'missing.py'}")
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert "No such file" in missing.stderr
    assert not (tmp_path / "run").exists()


def test_overriding_a_swept_field_is_refused_before_compiling(tmp_path):
    result = run_main("--config=configs/quickstart.py",
                      "--config.data.prompt_strategy=cot_special_token",
                      f"--workdir={tmp_path / 'quickstart'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --config.data.prompt_strategy overrides a swept field: config.sweep.axes sweeps "
        "data.prompt_strategy over ('cot', 'standard')")
    assert not (tmp_path / "quickstart").exists()


def test_check_overrides_compares_dotted_paths():
    config = load(os.path.join(os.path.dirname(__file__), "configs", "tiny_sweep.py"))
    sweep.check_overrides(config, ["train.batch_size", "sweep.member", "data.vocab_size"])
    for path in ("train.lr", "data", "train"):  # the field itself, or a group holding it
        with pytest.raises(config_lib.ConfigError, match=r"config.sweep.axes sweeps "):
            sweep.check_overrides(config, [path])
    config.sweep.axes = (("data.cot_example_prob_recipe_info.alpha", (0.0, 1.0)),)
    with pytest.raises(config_lib.ConfigError, match="recipe_info.alpha over"):
        sweep.check_overrides(config, ["data.cot_example_prob_recipe_info"])
