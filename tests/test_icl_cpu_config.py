"""configs/icl_cpu.py: a CoT/standard pair that trains as one packed program on tasks whose DAG
is drawn afresh per task (one parent per chain token, one processor), evaluated over K."""

import importlib.util
import os

import numpy as np

from cotlab_jax import config as config_lib
from cotlab_jax import data, experiment, sweep

PATH = os.path.join(os.path.dirname(__file__), "..", "configs", "icl_cpu.py")


def load_config():
    spec = importlib.util.spec_from_file_location("icl_cpu", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_icl_cpu_expands_to_a_packed_cot_standard_pair():
    members = sweep.expand(load_config())
    assert [m.config.data.prompt_strategy for m in members] == ["cot", "standard"]
    for member in members:
        exp = experiment.setup(member.config)  # validates every group
        assert exp.spec.K == 8
        # The final evaluation measures accuracy at every example count 1..K.
        counts = config_lib.parse_example_counts(member.config.eval.example_counts, exp.spec.K)
        assert counts == tuple(range(1, 9))
    packs = sweep.plan(members, {m.index: 0 for m in members}, members[0].config.sweep.packing)
    assert [len(pack) for pack in packs] == [2]


def test_icl_cpu_draws_a_fresh_single_parent_dag_per_task():
    member = sweep.expand(load_config())[0].config
    spec = data.TaskSpec.from_config(member)
    keys = data.root_keys(member.seed)
    world = data.make_world(keys["world"], spec)
    assert world["processor_pool"].shape[0] == 1  # one token processor for every task
    batch = data.sample_batch(world, keys["train"], 0, spec, 32)
    adj = np.asarray(batch["adj"])  # [B, C, M=1]: chain token j's parent
    assert adj.shape == (32, 3, 1)
    assert len({tuple(dag.ravel()) for dag in adj}) > 8  # 3 * 4 * 5 = 60 possible DAGs
