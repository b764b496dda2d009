"""Task specs, eval sets, a scripted model and NumPy oracles shared by the evaluation tests."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cotlab_jax import config as config_lib
from cotlab_jax import data, rundir

RECIPE = {"type": "power_law", "initial_prob": 0.0, "final_prob": 1.0, "alpha": 1.0, "scale": 1.0}
VOCAB = 16  # small, so that a random model's greedy tokens hit chain tokens now and then


def task_spec(**data_fields) -> data.TaskSpec:
    """The spec of the base config with these `config.data` fields (and a recipe for hybrid)."""
    config = config_lib.get_base_config()
    config.train.n_tasks = 1000
    if data_fields.get("prompt_strategy") == "hybrid_special_token":
        config.data.cot_example_prob_recipe_info = RECIPE
    config.data.update(data_fields)
    return data.TaskSpec.from_config(config)


def make_spec(**data_fields) -> data.TaskSpec:
    """Variable n, c and k, so masks matter everywhere."""
    return task_spec(
        **{
            **dict(
                vocab_size=VOCAB,
                n_dims=6,
                n_input_choices=(3, 4),
                n_parent_choices=(2,),
                chain_length_choices=(2, 3, 4),
                n_example_choices=(3, 5),
            ),
            **data_fields,
        }
    )


@functools.cache
def world_and_eval_set(spec: data.TaskSpec, n_tasks: int, seed: int = 0):
    keys = data.root_keys(seed)
    world = data.make_world(keys["world"], spec)
    return world, data.build_eval_set(world, keys["eval"], spec, n_tasks, chunk_size=n_tasks)


class ScriptedModel(nnx.Module):
    """A stand-in for `model.Llama` that always predicts `table[current token]` (its logits are a
    scaled one-hot). It has the Llama call signature and `init_cache`, so `model.apply` and
    `decode.greedy_decode` run it unchanged; the table is state, so new scripts reuse a compile."""

    def __init__(self, table):
        self.vocab_size = len(table)
        self.table = nnx.Variable(jnp.asarray(table, jnp.int32))

    def __call__(self, input_ids, positions, key_mask, kv_cache=None, cache_index=0):
        return 10.0 * jax.nn.one_hot(self.table[...][input_ids], self.vocab_size), kv_cache

    def init_cache(self, batch_size, cache_length):
        return jnp.zeros(()), jnp.zeros(())


def scripted_model(spec: data.TaskSpec, script: dict[int, int], default: int):
    table = np.full(spec.vocab_size, default)
    for token, following in script.items():
        table[token] = following
    return nnx.split(ScriptedModel(table))


def answers(eval_set) -> np.ndarray:
    rows = np.arange(len(eval_set["k"]))
    return eval_set["chain"][rows, eval_set["k"] - 1, eval_set["c"] - 1]


def real_tokens(ids, mask) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(np.asarray(ids), np.asarray(mask), strict=True)]


def answer_rule(
    prompt_last: int, generated: list[int], answer: int, spec: data.TaskSpec
) -> tuple[bool, bool]:
    """(correct, format_ok) of one generation, written plainly."""
    output = [prompt_last, *generated]
    ending = output[-4:]
    format_ok = (
        len(output) >= 4
        and ending[0] == spec.token_id("answer_start")
        and 0 <= ending[1] < spec.usable_vocab_size
        and ending[2] == spec.token_id("answer_end")
        and ending[3] == spec.token_id("eos")
    )
    return format_ok and ending[1] == answer, format_ok


def cross_entropy(logits: np.ndarray, label: int) -> float:
    logits = np.asarray(logits, np.float64)
    top = logits.max()
    return float(top + np.log(np.exp(logits - top).sum()) - logits[label])


def teacher_forced_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(summed cross-entropy, count) over labelled positions, logits at t-1 against label t."""
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for t in np.flatnonzero(labels[row, 1:] != data.IGNORE_INDEX) + 1:
            total += cross_entropy(logits[row, t - 1], labels[row, t])
            count += 1
    return total, count


def stand_in_run(
    monkeypatch,
    workdir: str,
    spec: data.TaskSpec,
    eval_set,
    graphdef,
    state,
    *,
    batch_size: int,
    max_pred_tokens: int,
    step: int = 7,
) -> list:
    """Makes `workdir` a run for `evaluate.cli.run_cli`: saves `eval_set` as its frozen eval set
    and replaces `rundir.load_run` by a stub that returns the given model at `step` (another
    step number raises `rundir.RunError`). Returns the list of (workdir, step) calls."""
    data.save_eval_set(f"{workdir}/eval_set.npz", eval_set, spec)
    config = config_lib.get_base_config()
    config.seed, config.eval.batch_size, config.eval.max_pred_tokens = (
        0,
        batch_size,
        max_pred_tokens,
    )
    loaded = types.SimpleNamespace(
        config=config,
        spec=spec,
        graphdef=graphdef,
        params=state,
        step=step,
        world=None,
        workdir=workdir,
    )
    calls = []

    def load_run(run_dir, which):
        calls.append((run_dir, which))
        if which not in ("latest", step):
            raise rundir.RunError(f"{run_dir} has no checkpoint at step {which}; it has [{step}]")
        return loaded

    monkeypatch.setattr(rundir, "load_run", load_run)
    return calls
