"""Ahead-of-time compilation of the train step for real TPU topologies (needs `libtpu`).

The 732M paper model (the default config at depth 12) must compile for a v5e 16x16 and a v4
4x4x4 slice and fit the chip's HBM; the results go to bench_results/aot_*.json, which the
README quotes. Those compiles take minutes on a CPU host, so they are marked `slow`; the tiny
model on a v5e 2x2 checks the machinery in seconds.
"""

import os

import pytest

pytest.importorskip("libtpu")

from cotlab_jax import aot  # noqa: E402
from cotlab_jax import config as config_lib  # noqa: E402

RESULTS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench_results"
)


def _topology_or_skip(name):
    try:
        return aot.get_topology(name)
    except Exception as e:  # no usable TPU compiler in this libtpu
        pytest.skip(f"TPU topology {name} unavailable: {e}")


def test_tiny_model_compiles_for_v5e_2x2():
    _topology_or_skip("v5e:2x2")
    config = config_lib.get_base_config()
    config.model.num_hidden_layers = 2
    config.model.hidden_size = 64
    config.model.intermediate_size = 256
    config.model.num_attention_heads = 4
    config.model.num_key_value_heads = 2
    config.model.head_dim = 16
    config.train.batch_size = 8
    result = aot.compile_for_topology(config, "v5e:2x2")
    assert result["n_devices"] == 4
    assert result["mesh"]["fsdp"] == 4
    assert result["fits_hbm"]
    assert result["compiled_flops_per_device"] > 0
    mem = result["memory_per_device_bytes"]
    # The donated state comes back in place: (nearly) all of the output aliases the arguments.
    assert mem["alias"] > 0.9 * mem["output"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "topology, out",
    [
        ("v5e:16x16", "aot_v5e_16x16.json"),
        ("v4:4x4x4", "aot_v4_4x4x4.json"),
    ],
)
def test_paper_model_fits_hbm(topology, out):
    _topology_or_skip(topology)
    config = config_lib.get_base_config()
    config.model.num_hidden_layers = 12  # the 732M paper model
    result = aot.compile_for_topology(config, topology)
    aot.write_json(result, os.path.join(RESULTS_DIR, out))
    assert 700e6 < result["n_params"] < 760e6
    assert result["batch_size"] == 64
    assert result["fits_hbm"], result["memory_per_device_bytes"]
    assert result["compiled_flops_per_step"] > 0
