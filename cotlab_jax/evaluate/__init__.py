"""Evaluation on the frozen eval set (docs/tasks.md section 4) and its variants.

    metrics = evaluate(graphdef, state, eval_set, spec, batch_size=64, max_pred_tokens=100)

One jitted `eval_step` turns a batch of eval tasks (fields as `data.sample_tasks`) into per-task
arrays; `aggregate` reduces them on host in float64, so the metrics do not depend on the eval
batch size. Metric names:

- `loss`: teacher-forced cross-entropy over every labelled token of the eval set (one mean over
  all tokens, as HF computes it for one batch; the reference instead averages batch means).
- `answer_acc`: the fraction of tasks whose final answer `chain[k-1, c-1]` was predicted.
- Without special tokens (`standard`, `cot`), greedy decoding of `spec.target_len` tokens:
  `chain_acc_{j}` and `chain_loss_{j}` per chain index j (over the tasks whose chain has index j;
  NaN if none does), and `answer_loss`, the cross-entropy at each task's answer index. The model's
  own earlier chain tokens are fed back, so `answer_acc` is free-running CoT accuracy.
- With special tokens, greedy decoding up to `max_pred_tokens` or `<eos>`: `format_acc` (the
  share of outputs the answer rule can read; the strict rule: the output ends
  `<ans_s> a <ans_e> <eos>` with `a` an ordinary token), and `gen_len_p{25,50,75,90,99}`
  (percentiles of the generated lengths, eos included).

Accuracy over example counts: `evaluate_over_k` evaluates every task with only its last K'
examples kept (the last is the query example; K' = 1 keeps no demonstration), for K' = 1 .. K in
one vmapped program (`eval_step_over_k`). `keep_last_examples` drops the earlier examples and
packs the rest left-padded again: exactly the task as if it never had them. `flatten_over_k`
names the results `answer_acc_k{K'}` and `loss_k{K'}`.

Size-packed members (`cotlab_jax.size_packing`: models of different sizes padded into one shape,
stacked on a member axis): `size_packed_eval_step` is `eval_step` (or `eval_step_over_k`) vmapped
over the members, each on its own tasks, and `evaluate_size_packed` evaluates them on their own
eval sets, with their own metrics, one program per batch.

Variants (the second paper) are pure functions of an eval set, applied before `evaluate`:
`drop_think_spans` (think spans removed from k demonstrations), `force_token` (`<think_s>` or
`<ans_s>` appended to every query), and an eval set built from `spec.with_changes(...)` for another
chain length or example count. The model has no maximum length: rotary position embeddings take
any position, so longer prompts than in training only leave the trained distribution.

Answer rules (`extract_answers`): with special tokens an output is read by `reference` (the
reference trainer's rule), `vllm` (the reference's sampling evaluator's) or `strict` (this lab's:
the full `<ans_s> a <ans_e> <eos>` ending); `evaluate` defaults to `strict`, the command line to
`reference`. Sampling (`evaluate_sampled`, the reference's vLLM evaluator): several generations
per query at a temperature / top-p (`cotlab_jax.sampling`, keyed per task and sample), the answer
taken by majority vote. `variant_spec` gives the run's spec with another prompt strategy or task
shape, refused where the trained vocabulary cannot take it.

The command line, `python -m cotlab_jax.evaluate`, is `cotlab_jax.evaluate.cli`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from cotlab_jax import config as config_lib
from cotlab_jax import data, decode, losses, model, sampling

IGNORE_INDEX = data.IGNORE_INDEX
GEN_LEN_PERCENTILES = (25, 50, 75, 90, 99)
# The fields of an eval set that `eval_step` and `eval_step_over_k` read.
EVAL_FIELDS = (
    "input_ids",
    "labels",
    "attention_mask",
    "positions",
    "query_ids",
    "query_mask",
    "target_ids",
    "chain",
    "n",
    "c",
    "k",
)
DROP_CHOICES = ("first", "last", "random")
FORCE_TOKENS = {"think": "think_start", "answer": "answer_start"}
ANSWER_RULES = config_lib.ANSWER_RULES
INVALID_ANSWER = IGNORE_INDEX  # the reference's pred_id for an output it cannot read


# ---------------------------------------------------------------------------------------------
# One batch.


def score_generations(
    last_prompt_token: jax.Array,
    tokens: jax.Array,
    lengths: jax.Array,
    answers: jax.Array,
    spec: data.TaskSpec,
) -> tuple[jax.Array, jax.Array]:
    """The strict answer rule: (correct [B], format_ok [B]).

    The output checked is the prompt's last token followed by the first `lengths` generated
    `tokens` [B, T] (later ones are ignored). Its format is right iff it ends
    `<ans_s> a <ans_e> <eos>` with `a` an ordinary (non-reserved) token; it is correct iff also
    `a == answers`. Prepending the prompt's last token lets a forced `<ans_s>` count as the start of
    the ending; an ordinary query ends with `<in_e>` (a forced `<think_s>` likewise) and can never
    be part of it, so there the model must produce the whole ending itself.
    """
    answer, format_ok = extract_answers(last_prompt_token, tokens, lengths, spec, "strict")
    return format_ok & (answer == answers), format_ok


def _from_end(output: jax.Array, end: jax.Array, offsets: tuple[int, ...]) -> jax.Array:
    """[B, len(offsets)]: `output[b, end[b] + offset]` for each offset (clipped at 0)."""
    index = jnp.maximum(end[:, None] + jnp.asarray(offsets)[None, :], 0)
    return jnp.take_along_axis(output, index, axis=1)


def extract_answers(
    last_prompt_token: jax.Array,
    tokens: jax.Array,
    lengths: jax.Array,
    spec: data.TaskSpec,
    rule: str,
) -> tuple[jax.Array, jax.Array]:
    """(answer int32 [B], valid bool [B]) read from generations by an answer rule.

    `tokens` [B, T] are the generated tokens (`pad` after an eos), `lengths` [B] how many were
    generated (eos included), `last_prompt_token` [B] the query's last token. Rules:

    - `reference`: the reference's training-time rule (core/train.py, `cot_evaluate` of the
      special-token trainer, Hugging Face greedy `generate` with `<eos>` as eos). Every pad id is
      removed from the output; it is readable iff at least 4 tokens remain, `[-4]` is `<ans_s>`
      and `[-2]` is `<ans_e>`; the answer is `[-3]` (any id, reserved ones included). `[-1]` is not
      checked, so an output cut off by the token budget can pass. Here the output is the prompt's
      last token followed by the generation: the same as the reference's generation alone unless
      the prompt ends with a forced `<ans_s>` (the reference's trainer never forces), which then
      counts as `[-4]`.
    - `vllm`: the rule of the reference's sampling evaluator (inference/vllm/
      evaluator_special_token.py). The output is the generation alone up to and including its
      `<eos>` (vLLM keeps a stop token id in `token_ids`; pads are not removed); it is readable iff
      it has at least 3 tokens and `[-2]` is `<ans_e>`; the answer is `[-3]`. `<ans_s>` and
      `<eos>` are not checked.
    - `strict`: this lab's rule (`score_generations`): the prompt's last token and the
      generation end `<ans_s> a <ans_e> <eos>` with `a` an ordinary token.

    An unreadable output has answer `INVALID_ANSWER`.
    """
    if rule not in ANSWER_RULES:
        raise ValueError(f"answer_rule={rule!r}: expected one of {ANSWER_RULES}")
    output = jnp.concatenate([last_prompt_token[:, None], tokens], axis=1)
    generated = jnp.arange(output.shape[1])[None, :] <= lengths[:, None]  # the prompt token too
    if rule == "reference":
        kept = generated & (output != spec.token_id("pad"))
        order = jnp.argsort(~kept, axis=1, stable=True)  # kept tokens first, in order
        output, end = jnp.take_along_axis(output, order, axis=1), kept.sum(1) - 1
        ending = _from_end(output, end, (-3, -2, -1))
        valid = (
            (end >= 3)
            & (ending[:, 0] == spec.token_id("answer_start"))
            & (ending[:, 2] == spec.token_id("answer_end"))
        )
        answer = ending[:, 1]
    elif rule == "vllm":
        ending = _from_end(output, lengths, (-2, -1))  # output[lengths] is the last generated
        valid = (lengths >= 3) & (ending[:, 1] == spec.token_id("answer_end"))
        answer = ending[:, 0]
    else:
        ending = _from_end(output, lengths, (-3, -2, -1, 0))
        answer = ending[:, 1]
        valid = (
            (lengths >= 3)
            & (ending[:, 0] == spec.token_id("answer_start"))
            & (answer >= 0)
            & (answer < spec.usable_vocab_size)
            & (ending[:, 2] == spec.token_id("answer_end"))
            & (ending[:, 3] == spec.token_id("eos"))
        )
    return jnp.where(valid, answer, INVALID_ANSWER).astype(jnp.int32), valid


def _eval_batch(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    batch: dict[str, jax.Array],
    spec: data.TaskSpec,
    max_pred_tokens: int | None = None,
    answer_rule: str = "strict",
    sizes: model.MemberSizes | None = None,
) -> dict[str, jax.Array]:
    """Per-task evaluation of a batch of eval tasks (the `EVAL_FIELDS` of `data.sample_tasks`).
    `sizes`: None, or a size-packed member's `model.MemberSizes` (`cotlab_jax.size_packing`).

    Returns, each with leading axis B:
      loss_sum float32, loss_count int32   the teacher-forced loss of `input_ids`/`labels`.
      predictions int32 [B, T]             the greedily generated tokens (pad after an eos).
      answer_correct bool
    and without special tokens (T = spec.target_len, no eos):
      chain_correct bool [B, T], chain_loss float32 [B, T]
                                           per step: token == target, and the cross-entropy of
                                           the step's logits against the target (False / 0 where
                                           the target is -100: beyond the task's chain).
      chain_mask bool [B, T]               target_ids != -100.
    or with special tokens (T = max_pred_tokens, stopping at `<eos>`):
      format_ok bool, gen_len int32        whether `answer_rule` (see `extract_answers`) could
                                           read the output; gen_len counts the eos.
    """
    logits = model.apply(
        graphdef,
        state,
        batch["input_ids"],
        batch["positions"],
        batch["attention_mask"],
        sizes=sizes,
    )
    _, loss_sum, loss_count = losses.teacher_forced_loss(logits, batch["labels"])
    out = dict(loss_sum=loss_sum, loss_count=loss_count)
    pad = spec.token_id("pad")
    query_ids, query_mask = batch["query_ids"], batch["query_mask"]
    if spec.special_tokens:
        if max_pred_tokens is None:
            raise ValueError("max_pred_tokens is needed with special tokens")
        tokens, _, lengths = decode.greedy_decode(
            graphdef,
            state,
            query_ids,
            query_mask,
            max_pred_tokens,
            spec.token_id("eos"),
            pad,
            sizes=sizes,
        )
        answer, format_ok = extract_answers(query_ids[:, -1], tokens, lengths, spec, answer_rule)
        out.update(
            predictions=tokens,
            answer_correct=format_ok & (answer == task_answers(batch)),
            format_ok=format_ok,
            gen_len=lengths,
        )
    else:
        tokens, step_logits, _ = decode.greedy_decode(
            graphdef, state, query_ids, query_mask, spec.target_len, None, pad, sizes=sizes
        )
        targets = batch["target_ids"]
        chain_loss, chain_mask = losses.token_cross_entropy(step_logits, targets)
        chain_correct = tokens == targets  # never true where the target is -100
        # The answer is each task's last target: chain index c-1 (cot) or 0 (standard).
        answer_index = (chain_mask.sum(-1) - 1)[:, None]
        out.update(
            predictions=tokens,
            chain_correct=chain_correct,
            chain_loss=chain_loss,
            chain_mask=chain_mask,
            answer_correct=jnp.take_along_axis(chain_correct, answer_index, axis=1)[:, 0],
        )
    return out


eval_step = jax.jit(_eval_batch, static_argnames=("spec", "max_pred_tokens", "answer_rule"))


def task_answers(batch: dict[str, jax.Array]) -> jax.Array:
    """int32 [B]: each task's final answer `chain[k-1, c-1]`."""
    return batch["chain"][jnp.arange(len(batch["k"])), batch["k"] - 1, batch["c"] - 1]


# ---------------------------------------------------------------------------------------------
# Fewer in-context examples.


def example_index(
    ids: jax.Array, mask: jax.Array, n: jax.Array, c: jax.Array, spec: data.TaskSpec
) -> jax.Array:
    """int32 [B, L]: the example (0-based) each real token of left-padded `ids` [B, L] belongs
    to; -1 on padding and on the `<bos>` prefix. `n`, `c` [B] are the tasks' input and chain counts.

    Read from the tokens alone, so it holds for training sequences, queries and their variants
    (think spans dropped, a forced token): with special tokens an example starts at each
    `<in_s>`; without, all of a task's examples have one length (n + c for `cot`, n + 1 for
    `standard`).
    """
    mask = mask.astype(bool)
    if spec.special_tokens:
        starts = (ids == spec.token_id("input_start")) & mask
        index = jnp.cumsum(starts, axis=-1, dtype=jnp.int32) - 1
    else:
        length = n + (c if spec.prompt_strategy == "cot" else 1)
        index = model.positions_from_mask(mask) // length[:, None]
    return jnp.where(mask, index, -1).astype(jnp.int32)


def _pack_right(kept: jax.Array, *rows: tuple[jax.Array, int]) -> tuple[jax.Array, list]:
    """Left-pads again after dropping tokens: each (values [B, L], fill) of `rows` with its
    `kept` [B, L] entries moved, in order, to the right end and `fill` before them; also the new
    mask."""
    order = jnp.argsort(kept, axis=-1, stable=True)  # dropped entries first, both in order
    mask = jnp.take_along_axis(kept, order, axis=-1)
    return mask, [
        jnp.where(mask, jnp.take_along_axis(values, order, axis=-1), fill) for values, fill in rows
    ]


def keep_last_examples(
    batch: dict[str, jax.Array], n_examples: jax.Array | int, spec: data.TaskSpec
) -> dict[str, jax.Array]:
    """The batch with only each task's last `n_examples` (a scalar, may be traced) examples in
    the training sequence (`input_ids`, `labels`, `attention_mask`, `positions`) and the query
    (`query_ids`, `query_mask`, and `query_positions` if present); `<bos>` stays.

    The kept tokens are packed left-padded again, so each row is exactly the layout of a task that
    never had the earlier examples. Masking them in place would be too, but for the labelled
    `<bos>`: the loss counts it only when a pad precedes it. Tasks with k <= n_examples are
    unchanged. Reads `n`, `c`, `k`; `k` and the targets stay, as the last example is always kept.
    Jittable.
    """
    first_kept = (batch["k"] - n_examples)[:, None]
    pad = spec.token_id("pad")

    def kept(ids, mask):
        index = example_index(ids, mask, batch["n"], batch["c"], spec)
        return mask.astype(bool) & ((index < 0) | (index >= first_kept))  # index < 0: <bos>

    out = dict(batch)
    mask, (input_ids, labels) = _pack_right(
        kept(batch["input_ids"], batch["attention_mask"]),
        (batch["input_ids"], pad),
        (batch["labels"], IGNORE_INDEX),
    )
    out.update(
        input_ids=input_ids,
        labels=labels,
        attention_mask=mask,
        positions=model.positions_from_mask(mask),
    )
    query_mask, (query_ids,) = _pack_right(
        kept(batch["query_ids"], batch["query_mask"]), (batch["query_ids"], pad)
    )
    out.update(query_ids=query_ids, query_mask=query_mask)
    if "query_positions" in batch:
        out["query_positions"] = model.positions_from_mask(query_mask)
    return out


@functools.partial(jax.jit, static_argnames=("spec", "max_pred_tokens", "answer_rule"))
def eval_step_over_k(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    batch: dict[str, jax.Array],
    spec: data.TaskSpec,
    max_pred_tokens: int | None,
    example_counts: jax.Array,
    answer_rule: str = "strict",
) -> dict[str, jax.Array]:
    """`eval_step` of the batch with only the last `example_counts[i]` examples of every task
    kept, for each i of example_counts int32 [NK], as one program: every output of `eval_step`
    gains a leading axis NK."""
    return _eval_batch_over_k(
        graphdef, state, batch, spec, max_pred_tokens, example_counts, answer_rule, None
    )


def _eval_batch_over_k(
    graphdef, state, batch, spec, max_pred_tokens, example_counts, answer_rule, sizes
):
    def one_count(n_examples):
        return _eval_batch(
            graphdef,
            state,
            keep_last_examples(batch, n_examples, spec),
            spec,
            max_pred_tokens,
            answer_rule,
            sizes,
        )

    return jax.vmap(one_count)(example_counts)


@functools.partial(jax.jit, static_argnames=("spec", "max_pred_tokens", "answer_rule"))
def size_packed_eval_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    sizes: model.MemberSizes,
    batch: dict[str, jax.Array],
    spec: data.TaskSpec,
    max_pred_tokens: int | None,
    example_counts: jax.Array | None,
    answer_rule: str = "strict",
) -> dict[str, jax.Array]:
    """`eval_step` (with `example_counts`: `eval_step_over_k`) of size-packed members
    (`cotlab_jax.size_packing`: `params` and `sizes` with a leading member axis R), each on its
    own tasks: the batch's fields are [B, R, ...]. Outputs gain an axis R after the task axis:
    [B, R, ...], or [NK, B, R, ...] over example counts."""

    def one_member(params, sizes, batch):
        if example_counts is None:
            return _eval_batch(graphdef, params, batch, spec, max_pred_tokens, answer_rule, sizes)
        return _eval_batch_over_k(
            graphdef, params, batch, spec, max_pred_tokens, example_counts, answer_rule, sizes
        )

    out_axis = 1 if example_counts is None else 2
    return jax.vmap(one_member, in_axes=(0, 0, 1), out_axes=out_axis)(params, sizes, batch)


# ---------------------------------------------------------------------------------------------
# The whole eval set.


def aggregate(per_task: dict[str, np.ndarray], spec: data.TaskSpec) -> dict[str, float]:
    """The eval set's metrics (names in the module docstring) from `eval_step`'s per-task arrays
    of every task, reduced in float64."""
    f64 = {name: np.asarray(value, np.float64) for name, value in per_task.items()}
    metrics = dict(
        loss=f64["loss_sum"].sum() / max(f64["loss_count"].sum(), 1.0),
        answer_acc=f64["answer_correct"].mean(),
    )
    if spec.special_tokens:
        metrics["format_acc"] = f64["format_ok"].mean()
        for q, value in zip(
            GEN_LEN_PERCENTILES, np.percentile(f64["gen_len"], GEN_LEN_PERCENTILES), strict=True
        ):
            metrics[f"gen_len_p{q}"] = value
    else:
        mask = per_task["chain_mask"]
        counts = mask.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN for an index no task has
            acc = f64["chain_correct"].sum(0) / counts
            loss = f64["chain_loss"].sum(0) / counts
        for j in range(mask.shape[1]):
            metrics[f"chain_acc_{j}"] = acc[j]
            metrics[f"chain_loss_{j}"] = loss[j]
        answer_index = mask.sum(1) - 1
        metrics["answer_loss"] = np.take_along_axis(
            f64["chain_loss"], answer_index[:, None], axis=1
        ).mean()
    return {name: float(value) for name, value in metrics.items()}


def _per_task_outputs(
    step,
    eval_set: dict[str, np.ndarray],
    spec: data.TaskSpec,
    batch_size: int,
    batch_sharding: jax.sharding.Sharding | None,
    task_axis: int = 0,
    fields: tuple[str, ...] = EVAL_FIELDS,
) -> dict[str, np.ndarray]:
    """`step(batch)`'s arrays for every task of `eval_set`, concatenated along `task_axis`.

    The set runs in batches of `batch_size` (the `fields`, placed by `batch_sharding`); the
    last one is filled up with copies of the last task (every query needs a real token) whose
    results are dropped, so there is one compilation.
    """
    n_tasks = len(eval_set["k"])
    if n_tasks == 0:
        raise ValueError("the eval set is empty")
    if eval_set["input_ids"].shape[-1] != spec.seq_len:
        raise ValueError(
            f"the eval set's sequences have length {eval_set['input_ids'].shape[-1]}, "
            f"spec {spec.prompt_strategy!r} expects {spec.seq_len}: another spec?"
        )
    outputs = []
    for start in range(0, n_tasks, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n_tasks - 1)
        batch = jax.device_put({name: eval_set[name][rows] for name in fields}, batch_sharding)
        outputs.append(step(batch))
    # Global arrays of a multi-host mesh are gathered to every process (a no-op on one).
    outputs = multihost_utils.process_allgather(outputs, tiled=True)
    first_tasks = (slice(None),) * task_axis + (slice(n_tasks),)
    return {
        name: np.concatenate([out[name] for out in outputs], axis=task_axis)[first_tasks]
        for name in outputs[0]
    }


def evaluate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    eval_set: dict[str, np.ndarray],
    spec: data.TaskSpec,
    *,
    batch_size: int,
    max_pred_tokens: int,
    return_predictions: bool = False,
    batch_sharding: jax.sharding.Sharding | None = None,
    answer_rule: str = "strict",
):
    """Metrics of the model on an eval set (a dict of NumPy arrays, as `data.build_eval_set`).

    The set runs in batches of `batch_size`; the last one is filled up with copies of the last task
    (every query needs a real token) whose results are dropped, so there is one compilation.
    `max_pred_tokens` is the decoding budget with special tokens (unused without), `answer_rule`
    how their outputs are read (see `extract_answers`). `batch_sharding` places every batch
    (e.g. over a mesh's data axes); default: one device.

    Returns the metrics dict, or with `return_predictions` (metrics, per_task): `eval_step`'s
    per-task arrays for every task, `predictions` among them.
    """
    max_pred_tokens = max_pred_tokens if spec.special_tokens else None
    per_task = _per_task_outputs(
        lambda batch: eval_step(graphdef, state, batch, spec, max_pred_tokens, answer_rule),
        eval_set,
        spec,
        batch_size,
        batch_sharding,
    )
    metrics = aggregate(per_task, spec)
    return (metrics, per_task) if return_predictions else metrics


def evaluate_over_k(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    eval_set: dict[str, np.ndarray],
    spec: data.TaskSpec,
    *,
    example_counts=None,
    batch_size: int,
    max_pred_tokens: int,
    batch_sharding: jax.sharding.Sharding | None = None,
    return_predictions: bool = False,
    answer_rule: str = "strict",
):
    """`evaluate`'s metrics with only each task's last K' examples kept, for every K' of
    `example_counts` (default 1 .. spec.K), all in one vmapped program per batch.

    Returns {K': metrics}, or with `return_predictions` ({K': metrics}, {K': per_task}).
    Batching, sharding and aggregation are `evaluate`'s; K' = K is `evaluate` itself.
    """
    counts = config_lib.parse_example_counts(
        "all" if example_counts is None else example_counts,
        spec.K,
        name="example_counts",
        allow_empty=False,
    )
    max_pred_tokens = max_pred_tokens if spec.special_tokens else None
    counts_array = np.asarray(counts, np.int32)
    stacked = _per_task_outputs(
        lambda batch: eval_step_over_k(
            graphdef, state, batch, spec, max_pred_tokens, counts_array, answer_rule
        ),
        eval_set,
        spec,
        batch_size,
        batch_sharding,
        task_axis=1,
    )
    per_task = {
        count: {name: value[i] for name, value in stacked.items()} for i, count in enumerate(counts)
    }
    metrics = {count: aggregate(arrays, spec) for count, arrays in per_task.items()}
    return (metrics, per_task) if return_predictions else metrics


def evaluate_size_packed(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    sizes: model.MemberSizes,
    eval_sets: list[dict[str, np.ndarray]],
    spec: data.TaskSpec,
    *,
    batch_size: int,
    max_pred_tokens: int,
    example_counts=None,
    answer_rule: str = "strict",
) -> list[dict]:
    """`evaluate` of each size-packed member (`cotlab_jax.size_packing.Pack`'s graphdef, params
    and sizes) on its own eval set (`eval_sets`, one per member, of one task spec and size), and
    with `example_counts` (a list, "all", ...) also `evaluate_over_k`, all members in one
    program per batch. Returns per member {"metrics": ..., and "metrics_by_k": {K': metrics}}.
    When the counts include K, whose evaluation is `evaluate`'s (no example is dropped), the
    metrics come from it: one program, not two.
    """
    sizes_of_sets = {len(s["k"]) for s in eval_sets}
    if len(sizes_of_sets) != 1:
        raise ValueError(f"size-packed members need eval sets of one size, got {sizes_of_sets}")
    max_pred_tokens = max_pred_tokens if spec.special_tokens else None
    stacked = {name: np.stack([s[name] for s in eval_sets], axis=1) for name in EVAL_FIELDS}
    counts = (
        None
        if example_counts is None
        else config_lib.parse_example_counts(
            example_counts, spec.K, name="example_counts", allow_empty=False
        )
    )
    results = [{} for _ in eval_sets]
    if counts is None or spec.K not in counts:
        per_task = _per_task_outputs(
            lambda batch: size_packed_eval_step(
                graphdef, params, sizes, batch, spec, max_pred_tokens, None, answer_rule
            ),
            stacked,
            spec,
            batch_size,
            None,
        )
        for r, result in enumerate(results):
            result["metrics"] = aggregate({k: v[:, r] for k, v in per_task.items()}, spec)
    if counts is None:
        return results
    by_k = _per_task_outputs(
        lambda batch: size_packed_eval_step(
            graphdef,
            params,
            sizes,
            batch,
            spec,
            max_pred_tokens,
            np.asarray(counts, np.int32),
            answer_rule,
        ),
        stacked,
        spec,
        batch_size,
        None,
        task_axis=1,
    )
    for r, result in enumerate(results):
        result["metrics_by_k"] = {
            count: aggregate({k: v[i, :, r] for k, v in by_k.items()}, spec)
            for i, count in enumerate(counts)
        }
        result.setdefault("metrics", result["metrics_by_k"].get(spec.K))
    return results


def flatten_over_k(
    metrics_by_k: dict[int, dict[str, float]], names: tuple[str, ...] = ("answer_acc", "loss")
) -> dict[str, float]:
    """`{name}_k{K'}` for each of `names` and each K' of `evaluate_over_k`'s result (the trainer
    logs these as the metrics kind "eval_by_k")."""
    return {
        f"{name}_k{count}": metrics[name]
        for count, metrics in sorted(metrics_by_k.items())
        for name in names
    }


# ---------------------------------------------------------------------------------------------
# Sampling with a majority vote (the reference's vLLM evaluator).


def _sampled_eval_batch(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    batch: dict[str, jax.Array],
    spec: data.TaskSpec,
    max_pred_tokens: int | None,
    n_samples: int,
    answer_rule: str,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
) -> dict[str, jax.Array]:
    """Per-task evaluation with `n_samples` sampled generations per query and a majority vote.

    Sample s of task i (its index in the eval set, `batch["task_index"]`) draws from
    `fold_in(fold_in(key, i), s)` (then `sampling.step_key` per step), so results do not depend
    on the batch size. With special tokens each sample is read by `answer_rule`; without, its
    answer is its token at the task's answer index (chain index c-1 for `cot`, 0 for `standard`)
    and always readable. Returns, with leading axis B (S = n_samples, T the decode length):
      loss_sum, loss_count                 as `eval_step`.
      vote int32                           `sampling.majority_vote` of the samples' answers
                                           (`INVALID_ANSWER` for an unreadable one).
      answer_correct bool                  vote == the task's answer.
      sample_correct, sample_valid bool [B, S], predictions int32 [B, S, T], and with special
      tokens gen_len int32 [B, S].
    """
    logits = model.apply(
        graphdef, state, batch["input_ids"], batch["positions"], batch["attention_mask"]
    )
    _, loss_sum, loss_count = losses.teacher_forced_loss(logits, batch["labels"])
    task_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, batch["task_index"])
    keys = jax.vmap(lambda s: jax.vmap(jax.random.fold_in, (0, None))(task_keys, s))(
        jnp.arange(n_samples)
    )  # [S, B]
    query_ids, query_mask = batch["query_ids"], batch["query_mask"]
    eos = spec.token_id("eos") if spec.special_tokens else None
    length = max_pred_tokens if spec.special_tokens else spec.target_len
    tokens, lengths = sampling.sample_many(
        graphdef,
        state,
        query_ids,
        query_mask,
        length,
        eos,
        spec.token_id("pad"),
        keys,
        temperature,
        top_p,
    )
    if spec.special_tokens:
        answers, valid = jax.vmap(extract_answers, (None, 0, 0, None, None))(
            query_ids[:, -1], tokens, lengths, spec, answer_rule
        )
    else:
        answer_index = (batch["target_ids"] != IGNORE_INDEX).sum(-1) - 1
        answers = jnp.take_along_axis(tokens, answer_index[None, :, None], axis=2)[..., 0]
        valid = jnp.ones(answers.shape, bool)
    vote = sampling.majority_vote(answers)
    truth = task_answers(batch)
    out = dict(
        loss_sum=loss_sum,
        loss_count=loss_count,
        vote=vote,
        answer_correct=vote == truth,
        sample_correct=(answers == truth[None, :]).T,
        sample_valid=valid.T,
        predictions=tokens.transpose(1, 0, 2),
    )
    if spec.special_tokens:
        out["gen_len"] = lengths.T
    return out


sampled_eval_step = jax.jit(
    _sampled_eval_batch, static_argnames=("spec", "max_pred_tokens", "n_samples", "answer_rule")
)


def aggregate_sampled(per_task: dict[str, np.ndarray], spec: data.TaskSpec) -> dict[str, float]:
    """The metrics of `evaluate_sampled` from `sampled_eval_step`'s arrays of every task."""
    f64 = {name: np.asarray(value, np.float64) for name, value in per_task.items()}
    metrics = dict(
        loss=f64["loss_sum"].sum() / max(f64["loss_count"].sum(), 1.0),
        answer_acc=f64["answer_correct"].mean(),
        sample_answer_acc=f64["sample_correct"].mean(),
    )
    if spec.special_tokens:
        metrics["format_acc"] = f64["sample_valid"].mean()
        metrics["vote_invalid"] = (per_task["vote"] == INVALID_ANSWER).mean()
        for q, value in zip(
            GEN_LEN_PERCENTILES, np.percentile(f64["gen_len"], GEN_LEN_PERCENTILES), strict=True
        ):
            metrics[f"gen_len_p{q}"] = value
    return {name: float(value) for name, value in metrics.items()}


def check_sampling(n_samples: int, temperature: float, top_p: float) -> None:
    """Raises ValueError (one line) for sampling parameters `evaluate_sampled` cannot take."""
    if not (isinstance(n_samples, int) and n_samples >= 1):
        raise ValueError(f"n_samples={n_samples!r}: expected an integer >= 1")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r}: expected a finite number >= 0")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}: expected a number in (0, 1]")
    if n_samples > 1 and temperature == 0:
        raise ValueError(
            f"n_samples={n_samples} needs temperature > 0: greedy samples are all the same"
        )


def evaluate_sampled(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    eval_set: dict[str, np.ndarray],
    spec: data.TaskSpec,
    *,
    batch_size: int,
    max_pred_tokens: int,
    n_samples: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int = 0,
    answer_rule: str = "reference",
    return_predictions: bool = False,
    batch_sharding: jax.sharding.Sharding | None = None,
):
    """Metrics with `n_samples` generations per query at `temperature` / `top_p`, the answer
    taken by majority vote, as the reference's vLLM evaluator (inference/vllm/
    evaluator_special_token.py) scores a model.

    The reference samples with vLLM `SamplingParams(n=num_output_seqs, temperature,
    max_tokens=max_pred_tokens, stop_token_ids=[<eos>])` (top_p 1, no top-k, no seed: its draws
    are not reproducible; its defaults are n=1, temperature 0 = greedy, 100 tokens, and its sweep
    card tries temperatures 0.2 .. 1.0 with 4, 8 or 16 sequences). Here draws are keyed by
    `seed` and each task's index in the set (see `_sampled_eval_batch`), with `answer_rule` as
    in `extract_answers` (the reference's evaluator reads its samples by the `vllm` rule).
    One jitted program per batch: a `lax.while_loop` over decode steps with the key/value cache
    (`sampling.sample_decode`), vmapped over the samples. Batching and padding are `evaluate`'s.

    Metrics: `loss` (teacher-forced, as `evaluate`), `answer_acc` (the vote is right),
    `sample_answer_acc` (mean over all samples), and with special tokens `format_acc` (the share
    of samples the rule can read), `vote_invalid` (the share of tasks whose vote is the invalid
    sentinel) and `gen_len_p{25,..}` over all samples. Returns the metrics, or with
    `return_predictions` (metrics, per-task arrays).
    """
    check_sampling(n_samples, temperature, top_p)
    if answer_rule not in ANSWER_RULES:
        raise ValueError(f"answer_rule={answer_rule!r}: expected one of {ANSWER_RULES}")
    max_pred_tokens = max_pred_tokens if spec.special_tokens else None
    indexed = dict(eval_set, task_index=np.arange(len(eval_set["k"]), dtype=np.int32))
    key = jax.random.key(seed)
    temperature, top_p = np.float32(temperature), np.float32(top_p)
    per_task = _per_task_outputs(
        lambda batch: sampled_eval_step(
            graphdef,
            state,
            batch,
            spec,
            max_pred_tokens,
            n_samples,
            answer_rule,
            key,
            temperature,
            top_p,
        ),
        indexed,
        spec,
        batch_size,
        batch_sharding,
        fields=(*EVAL_FIELDS, "task_index"),
    )
    metrics = aggregate_sampled(per_task, spec)
    return (metrics, per_task) if return_predictions else metrics


# ---------------------------------------------------------------------------------------------
# Variants (the second paper).


def variant_spec(
    spec: data.TaskSpec,
    *,
    prompt_strategy: str | None = None,
    n_inputs: int | None = None,
    n_parents: int | None = None,
    chain_length: int | None = None,
    n_examples: int | None = None,
) -> data.TaskSpec:
    """The run's spec with another prompt strategy and/or one fixed task shape (N, M, C, K), for
    a fresh eval set made from the run's world (embeddings, processor pool) and eval key.

    This is how the reference's special-token evaluator builds its set (inference/base/
    base_evaluator.py): `Args(prompt_strategy="cot_special_token", n_input_choices=(N,),
    n_parent_choices=(M,), chain_length_choices=(C,), n_example_choices=(K,), n_eval_tasks)`,
    every other field the default; defaults N=M=C=4, K=40, 1000 tasks, `ablation_fixed_H=True`
    with `num_unique_H=1`. Its embeddings come from `seed` (42) and its tasks from `seed + 1000`,
    as at training, so it shares the training run's embeddings only when the run used the
    default seed, vocabulary and dimensions; here the world is always the run's own.
    Raises ValueError (one line) where the model cannot take the change:
    - special tokens on or off: a run trained without them has no reserved ids (its top 9 ids
      are ordinary tokens it has seen as inputs), and one trained with them has never seen those
      ids as inputs or chain tokens, nor prompts without markers;
    - `hybrid_special_token` without the run's CoT-probability recipe;
    - another N, M or C under the run's single fixed DAG (`data.ablation_fixed_dag`).
    """
    changes = {}
    if prompt_strategy is not None and prompt_strategy != spec.prompt_strategy:
        if prompt_strategy not in config_lib.PROMPT_STRATEGIES:
            raise ValueError(
                f"prompt_strategy={prompt_strategy!r}: expected one of "
                f"{config_lib.PROMPT_STRATEGIES}"
            )
        same_family = tuple(
            s
            for s in config_lib.PROMPT_STRATEGIES
            if config_lib.uses_special_tokens(s) == spec.special_tokens
        )
        if config_lib.uses_special_tokens(prompt_strategy) != spec.special_tokens:
            why = (
                "has no special tokens in its vocabulary"
                if not spec.special_tokens
                else f"reserves its top {config_lib.NUM_RESERVED_TOKENS} ids for special tokens"
            )
            raise ValueError(
                f"prompt_strategy={prompt_strategy!r}: the run was trained with "
                f"{spec.prompt_strategy!r}, which {why}; expected one of "
                f"{same_family}"
            )
        if prompt_strategy == "hybrid_special_token" and spec.recipe is None:
            raise ValueError(
                "prompt_strategy='hybrid_special_token': the run has no CoT-example "
                "probability recipe (data.cot_example_prob_recipe_info) to draw with"
            )
        changes["prompt_strategy"] = prompt_strategy
    shape = (
        ("n_inputs", n_inputs, "n_input_choices", spec.N),
        ("n_parents", n_parents, "n_parent_choices", spec.M),
        ("chain_length", chain_length, "chain_length_choices", spec.C),
        ("n_examples", n_examples, "n_example_choices", None),
    )
    for name, value, field, fixed_by_dag in shape:
        if value is None:
            continue
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        if spec.ablation_fixed_dag and fixed_by_dag is not None and value != fixed_by_dag:
            raise ValueError(
                f"{name}={value}: the run's single fixed DAG "
                f"(data.ablation_fixed_dag) has {name} {fixed_by_dag}"
            )
        changes[field] = (value,)
    return spec.with_changes(**changes)


def _replace_queries(eval_set, query_ids, query_mask, **extra) -> dict[str, np.ndarray]:
    out = dict(eval_set)
    out.update(
        query_ids=np.asarray(query_ids),
        query_mask=np.asarray(query_mask),
        query_positions=np.asarray(model.positions_from_mask(query_mask)),
        **{name: np.asarray(value) for name, value in extra.items()},
    )
    return out


@functools.partial(jax.jit, static_argnames=("spec", "which"))
def _drop_think_queries(inputs, chain, n, c, k, is_cot, n_drop, key, spec, which):
    K = spec.K
    cot_demo = is_cot & (jnp.arange(K)[None, :] < (k - 1)[:, None])
    if which == "random":
        # Keyed by the task's index in the set, so a task's choice does not depend on the others.
        score = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (K,)))(
            jnp.arange(is_cot.shape[0])
        )
    else:
        score = jnp.broadcast_to(jnp.arange(K) * (1.0 if which == "first" else -1.0), is_cot.shape)
    rank = jnp.argsort(jnp.argsort(jnp.where(cot_demo, score, jnp.inf), axis=1), axis=1)
    dropped = cot_demo & (rank < n_drop)
    tasks = jax.vmap(data.layout_task, (0, 0, 0, 0, 0, 0, None))(
        inputs, chain, n, c, k, is_cot & ~dropped, spec
    )
    return tasks["query_ids"], tasks["query_mask"], dropped


def drop_think_spans(
    eval_set: dict[str, np.ndarray],
    spec: data.TaskSpec,
    n_drop: int,
    which: str,
    key: jax.Array | None = None,
) -> dict[str, np.ndarray]:
    """The eval set with `<think_s> .. <think_e>` removed from `n_drop` demonstrations per query.

    The demonstrations are chosen among the query's CoT demonstrations (examples before the last
    one that have a think span): the `first` or `last` n_drop of them, or `random` ones (drawn from
    `key`, per task by its index in the set). A task with fewer CoT demonstrations loses all its
    think spans (the reference asserts there are enough instead). A special-token CoT example
    without its think span is exactly the direct form, so the query is re-laid out by
    `data.layout_task` with those examples' `is_cot` set to False. Targets, the teacher-forced
    sequences and `is_cot` are unchanged; `think_dropped` bool [tasks, K] records the choice.
    """
    if spec.prompt_strategy not in ("cot_special_token", "hybrid_special_token"):
        raise ValueError(f"prompt_strategy {spec.prompt_strategy!r} has no think spans to drop")
    if which not in DROP_CHOICES:
        raise ValueError(f"which={which!r}: expected one of {DROP_CHOICES}")
    if which == "random" and key is None:
        raise ValueError("dropping random think spans needs a key")
    if n_drop < 0:
        raise ValueError(f"n_drop={n_drop}: expected >= 0")
    fields = (eval_set[name] for name in ("inputs", "chain", "n", "c", "k", "is_cot"))
    query_ids, query_mask, dropped = _drop_think_queries(
        *fields, n_drop, key if which == "random" else None, spec, which
    )
    return _replace_queries(eval_set, query_ids, query_mask, think_dropped=dropped)


def force_token(
    eval_set: dict[str, np.ndarray], spec: data.TaskSpec, which: str
) -> dict[str, np.ndarray]:
    """The eval set with `<think_s>` (`which="think"`) or `<ans_s>` (`"answer"`) appended to every
    query, which becomes one token longer.

    The forced token is part of the prompt: generation, `gen_len` and `predictions` are the
    model's continuation only, while the answer rule reads the forced token and the continuation
    (see `score_generations`), so after a forced `<ans_s>` the model must generate
    `a <ans_e> <eos>`. Targets and the teacher-forced sequences are unchanged.
    """
    if which not in FORCE_TOKENS:
        raise ValueError(f"which={which!r}: expected one of {tuple(FORCE_TOKENS)}")
    if not spec.special_tokens:
        raise ValueError(f"prompt_strategy {spec.prompt_strategy!r} has no special tokens to force")
    query_ids, query_mask = eval_set["query_ids"], eval_set["query_mask"]
    forced = np.full((len(query_ids), 1), spec.token_id(FORCE_TOKENS[which]), query_ids.dtype)
    return _replace_queries(
        eval_set,
        np.concatenate([query_ids, forced], axis=1),
        np.concatenate([query_mask, np.ones_like(query_mask[:, :1])], axis=1),
    )
