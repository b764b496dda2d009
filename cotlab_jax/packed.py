"""Sweep members packed into one program: their train states stacked on a leading `replica`
axis, stepped together by one vmapped, jitted train step.

Members may differ in whatever does not shape the program: the seed, the optimizer's numbers
(`experiment.OPTIMIZER_HPARAMS`, passed traced, one per member) and the task distribution except the
vocabulary. Each distinct task spec samples its members' batches (vmapped over their worlds and
keys); shorter sequences are left-padded to the pack's longest, which changes no member's loss:
padding is masked and positions count real tokens only. What members must share is `pack_key`.
On a mesh with a `replica` axis the members are sharded over it.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cotlab_jax import config as config_lib
from cotlab_jax import data, experiment, sharding

# Config fields (groups or single fields) that shape the packed program or its loop.
SHARED_FIELDS = (
    "model",
    "data.vocab_size",
    "train.n_tasks",
    "train.batch_size",
    "train.warmup_steps",
    "train.lr_schedule",
    "train.log_every_n_steps",
    "train.checkpoint_every_n_steps",
    "train.keep_checkpoints",
    "eval",
    "mesh",
    "log",
)
# The training batch's fields, all the step reads.
BATCH_FIELDS = ("input_ids", "labels", "attention_mask", "positions", "n_cot", "n_direct")


def _field(config, path: str):
    value = config
    for name in path.split("."):
        value = value[name]
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def pack_key(config: ml_collections.ConfigDict, same_length: bool) -> str:
    """Runs with equal keys can be packed: they agree on every `SHARED_FIELDS` entry and on
    whether gradients are clipped (and, with `same_length`, on the training sequence length)."""
    key = {path: _field(config, path) for path in SHARED_FIELDS}
    key["clipped"] = config.train.grad_clip_norm > 0
    if same_length:
        key["seq_len"] = data.TaskSpec.from_config(config).seq_len
    return json.dumps(key, sort_keys=True, default=str)


def _pad_left(x: jax.Array, length: int, fill) -> jax.Array:
    """[..., L] -> [..., length], `fill` in front."""
    widths = [(0, 0)] * (x.ndim - 1) + [(length - x.shape[-1], 0)]
    return jnp.pad(x, widths, constant_values=fill)


def sample_packed_batch(step, worlds, train_keys, spec_groups, seq_len: int, batch_size: int):
    """The members' batches of `step`, stacked [R, batch_size, ...] in member order.

    `spec_groups` is ((spec, member indices), ...); `worlds` and `train_keys` hold each group's
    members stacked. Sequences are left-padded to `seq_len`."""
    fills = dict(input_ids=None, labels=data.IGNORE_INDEX, attention_mask=False, positions=0)
    parts, order = [], []
    for (spec, members), world, key in zip(spec_groups, worlds, train_keys, strict=True):
        batch = jax.vmap(lambda w, k, spec=spec: data.sample_batch(w, k, step, spec, batch_size))(
            world, key
        )
        fills["input_ids"] = spec.token_id("pad")  # vocab_size - 1 for every strategy
        parts.append(
            {
                name: _pad_left(batch[name], seq_len, fills[name]) if name in fills else batch[name]
                for name in BATCH_FIELDS
            }
        )
        order.extend(members)
    back = np.argsort(order)  # group order -> member order
    return {
        name: sharding.constrain(
            jnp.concatenate([p[name] for p in parts])[back],
            ("replica", "batch") + (None,) * (parts[0][name].ndim - 2),
        )
        for name in BATCH_FIELDS
    }


def packed_train_step(
    state,
    worlds,
    train_keys,
    hparams,
    *,
    graphdef,
    exp: experiment.Experiment,
    spec_groups,
    seq_len: int,
):
    """One step of every member: sample, then `experiment.train_step` vmapped over the replica axis
    with each member's optimizer numbers."""
    batch = sample_packed_batch(
        state["step"][0], worlds, train_keys, spec_groups, seq_len, exp.batch_size
    )
    step = functools.partial(experiment.train_step, graphdef=graphdef, exp=exp)
    return jax.vmap(lambda s, b, h: step(s, b, hparams=h), spmd_axis_name="replica")(
        state, batch, hparams
    )


def _spec_groups(exps):
    groups: dict[data.TaskSpec, list[int]] = {}
    for i, exp in enumerate(exps):
        groups.setdefault(exp.spec, []).append(i)
    return tuple((spec, tuple(members)) for spec, members in groups.items())


def program(
    exps: list[experiment.Experiment], managers: list[ocp.CheckpointManager], start: int
) -> experiment.Program:
    """The packed training of `exps` (sharing `pack_key`), initialised or restored from each
    member's own checkpoint of step `start`."""
    exp = exps[0]
    mesh = exp.mesh
    config_lib.check_mesh(exp.config, mesh.shape, n_members=len(exps))
    spec_groups = _spec_groups(exps)
    seq_len = max(e.spec.seq_len for e in exps)
    seeds = jnp.asarray([e.config.seed for e in exps], jnp.int32)

    graphdef, member_layout = experiment.abstract_state(exp)

    def build_states(seeds):
        return jax.vmap(lambda s: experiment.build_state(exp, experiment.model_key(s)))(seeds)

    abstract = jax.eval_shape(build_states, seeds)
    layout = experiment.state_layout(abstract, mesh, ("replica",))
    packed_shardings = jax.tree.map(lambda x: x.sharding, layout)
    member_shardings = jax.tree.map(lambda x: x.sharding, member_layout)

    with jax.set_mesh(mesh):
        if start:
            stack = jax.jit(
                lambda states: jax.tree.map(lambda *xs: jnp.stack(xs), *states),
                out_shardings=packed_shardings,
            )
            state = stack(
                [m.restore(start, args=ocp.args.StandardRestore(member_layout)) for m in managers]
            )
        else:
            state = jax.jit(build_states, out_shardings=packed_shardings)(seeds)

        replicated = jax.sharding.NamedSharding(mesh, jax.P())

        def inputs():
            worlds, keys = [], []
            for spec, members in spec_groups:
                root = jax.vmap(data.root_keys)(seeds[np.asarray(members)])
                worlds.append(
                    jax.vmap(lambda k, spec=spec: data.make_world(k, spec))(root["world"])
                )
                keys.append(root["train"])
            return worlds, keys

        worlds, train_keys = jax.jit(inputs, out_shardings=replicated)()
        hparams = {
            name: jnp.asarray([e.config.train[name] for e in exps], jnp.float32)
            for name in experiment.OPTIMIZER_HPARAMS
        }
        step_fn = jax.jit(
            functools.partial(
                packed_train_step,
                graphdef=graphdef,
                exp=exp,
                spec_groups=spec_groups,
                seq_len=seq_len,
            ),
            donate_argnums=0,
            out_shardings=packed_shardings,
        )
        take = jax.jit(
            lambda state, i: jax.tree.map(lambda x: x[i], state), out_shardings=member_shardings
        )
    return experiment.Program(
        graphdef=graphdef,
        state=state,
        step=lambda state: step_fn(state, worlds, train_keys, hparams),
        member_state=lambda state, i: take(state, i),
        packed=True,
    )
