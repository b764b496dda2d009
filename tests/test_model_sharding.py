"""Logical axis rules, and the model sharded over 8 CPU devices computing what it computes whole.

tests/conftest.py gives every test process 8 CPU devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from model_helpers import forward, random_batch, tiny_config

from cotlab_jax import decode, model, sharding

MESH_SIZES = {"replica": 1, "data": 2, "fsdp": 2, "tensor": 2}


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": -1})


def test_make_mesh_resolves_the_remaining_axis(mesh):
    assert dict(mesh.shape) == MESH_SIZES
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="do not multiply"):
        sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})


@pytest.mark.parametrize(
    "names, shape, spec",
    [
        # Parameters: embed over fsdp, the model-parallel axis over tensor.
        (("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8), (None, "fsdp", "tensor", None)),
        (("layers", "mlp", "embed"), (2, 64, 32), (None, "tensor", "fsdp")),
        (("vocab", "embed"), (64, 32), ("tensor", "fsdp")),
        # Activations: batch takes data and fsdp first, so embed stays whole.
        (("batch", "length", "embed"), (8, 16, 32), (("data", "fsdp"), None, None)),
        (
            ("batch", "length", "heads", "head_dim"),
            (4, 16, 4, 8),
            (("data", "fsdp"), None, "tensor", None),
        ),
        # A batch of 2 does not divide over data x fsdp: it falls back to data, and embed
        # can use fsdp again.
        (("batch", "length", "embed"), (2, 16, 32), ("data", None, "fsdp")),
        # A dimension that divides over nothing is replicated.
        (("batch", "length", "vocab"), (1, 16, 63), (None, None, None)),
    ],
)
def test_logical_to_mesh_spec(names, shape, spec):
    got = sharding.logical_to_mesh_spec(names, shape, MESH_SIZES, sharding.DEFAULT_RULES)
    assert got == PartitionSpec(*spec)


def test_rules_can_be_overridden_with_flax_context(mesh):
    config = tiny_config()
    _, abstract = jax.eval_shape(lambda key: model.init(config, key), jax.random.key(0))
    with nnx.logical_axis_rules((("embed", "tensor"), ("mlp", "fsdp"))):
        shardings = sharding.state_shardings(abstract, mesh)
    spec = shardings["layers"]["mlp"]["gate_proj"].get_value().spec
    assert spec == PartitionSpec(None, "tensor", "fsdp")


def test_replica_stacked_state_is_sharded_over_replica():
    config = tiny_config()
    mesh = sharding.make_mesh({"replica": 2, "data": 2, "fsdp": 2, "tensor": 1})
    _, abstract = jax.eval_shape(
        jax.vmap(lambda key: model.init(config, key), out_axes=(None, 0)),
        jax.random.split(jax.random.key(0), 2),
    )
    shardings = sharding.state_shardings(abstract, mesh, leading_names=("replica",))
    spec = shardings["layers"]["self_attn"]["q_proj"].get_value().spec
    assert spec == PartitionSpec("replica", None, "fsdp", "tensor", None)  # tensor has size 1


def test_constrain_is_a_no_op_without_a_mesh_and_shards_with_one(mesh):
    x = jnp.ones((8, 4, 32))
    names = ("batch", "length", "embed")
    constrained = jax.jit(lambda x: sharding.constrain(x, names))
    assert constrained(x).sharding.is_fully_replicated
    with jax.set_mesh(mesh):
        out = constrained(x)
    assert out.sharding.spec == PartitionSpec(("data", "fsdp"))


def test_sharded_model_computes_the_same_logits_gradients_and_decoding(mesh):
    config = tiny_config(
        vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2
    )
    graphdef, state = model.init_sharded(config, jax.random.key(0), mesh)

    # Created sharded, following the rules.
    q_proj = state["layers"]["self_attn"]["q_proj"].get_value()
    assert q_proj.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert q_proj.addressable_shards[0].data.shape == (2, 16, 2, 8)
    assert state["embed_tokens"].get_value().sharding.spec == PartitionSpec("tensor", "fsdp")

    # The same numbers whole, on one device.
    whole = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
    ids, mask = random_batch(3, 8, 12, config.vocab_size)
    want_logits = np.asarray(forward(graphdef, whole, ids, mask))

    def loss(state, ids, mask):
        logits = model.apply(graphdef, state, ids, model.positions_from_mask(mask), mask)
        return jnp.mean(jax.nn.logsumexp(logits, -1) * mask)

    want_grads = jax.jit(jax.grad(loss))(whole, ids, mask)
    want_decode = decode.greedy_decode(graphdef, whole, ids, mask, 4, eos_id=5)

    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    ids, mask = jax.device_put((ids, mask), batch_sharding)
    with jax.set_mesh(mesh):
        logits = forward(graphdef, state, ids, mask)
        # As a train step would: gradients sharded like the parameters.
        state_shardings = sharding.state_shardings(state, mesh)
        grads = jax.jit(jax.grad(loss), out_shardings=state_shardings)(state, ids, mask)
        got_decode = decode.greedy_decode(graphdef, state, ids, mask, 4, eos_id=5)

    assert logits.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(logits, want_logits, atol=1e-4)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got_decode[0], want_decode[0])
    np.testing.assert_array_equal(got_decode[2], want_decode[2])
    np.testing.assert_allclose(got_decode[1], want_decode[1], atol=1e-4)
