"""How the trained models solve the tasks (the first paper's analyses; README "Analyses"):
attention to the DAG parents, learned embeddings against the data embeddings, and token coverage.

    metrics = dag_recovery(graphdef, params, eval_set, spec, batch_size=16)
    metrics.update(embedding_metrics(params, world, spec))
    metrics["token_coverage"] = token_coverage(world, key, spec, n_tasks=10_000)

DAG recovery. For every chain token `y_j` written in an example of a training sequence at position
`p`, the position that predicts it is `p - 1` (a causal LM reads `p - 1` to produce `p`). Its
attention row, per layer and head, is scored against the positions of `y_j`'s DAG parents in the
same example:
- parent mass: the attention probability summed over the parents' positions;
- top-m exact: 1 if the m positions of the same example that the row attends to most (among those
  it can attend to: the example's positions up to `p - 1`) are exactly the m parents, else 0.
  Ties count against: every parent must get strictly more than every other candidate.
Scores are averaged over chain tokens (pooled over tasks), separately for the query example
(example k-1 of the training sequence) and the demonstrations (examples 0..k-2). Only examples in
CoT form count, and only chain tokens whose parents are all written, so the `standard*` strategies
(no chain in the sequence) have nothing to measure and give NaN.

`dag_recovery_from_probs` works on captured attention (`model.apply(..., return_attention=True)`)
and returns sums and counts, so batches combine exactly (`combine_recovery_sums`,
`finalize_dag_recovery`). Flat metric names (l, h 0-based): `parent_mass_{query,demo}_L{l}H{h}`,
`parent_top_m_{query,demo}_L{l}H{h}`, and `parent_mass_{query,demo}_best`,
`parent_top_m_{query,demo}_best` (the maximum over layers and heads).

Embeddings (`embedding_probe`): `embed_probe_r2`, the held-out R² of a closed-form ridge probe from
the model's token embeddings to the data embeddings `E` (penalty chosen by cross-validation,
`embed_probe_ridge`), and `embed_cka`, their linear CKA.

Token coverage (`token_coverage`): distinct chain tokens over a set of sampled tasks, divided by the
usable vocabulary; a property of the sampler, so it needs no model.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from cotlab_jax import data, model

# The eval-set fields `dag_recovery` reads.
RECOVERY_FIELDS = (
    "input_ids",
    "positions",
    "attention_mask",
    "n",
    "c",
    "k",
    "is_cot",
    "adj",
    "parent_mask",
)
GROUPS = ("query", "demo")
_SUM_NAMES = ("parent_mass", "parent_top_m")


# ---------------------------------------------------------------------------------------------
# Where the tokens of an example sit in the training sequence.
#
# `data.layout_task` writes every example into S = N + C + 7 slots
#   <in_s> x_0..x_{N-1} <in_e> <think_s> y_0..y_{C-2} <think_e> <ans_s> y_last <ans_e> <eos>
# and packs the present ones, left-padded. We pack slot indices the same way (`data._pack_left`).


def _slot_of_dag_index(c, spec: data.TaskSpec):
    """Slot [N + C] of each DAG index (x_i at 1 + i; y_j at the think span, or the answer slot for
    j = c-1) and whether the index exists for this task's chain length (inputs: always here)."""
    N, C = spec.N, spec.C
    j = jnp.arange(C)
    chain_slot = jnp.where(j == c - 1, N + C + 4, N + 3 + jnp.minimum(j, C - 2))
    slots = jnp.concatenate([1 + jnp.arange(N), chain_slot])
    exists = jnp.concatenate([jnp.ones((N,), bool), j < c])
    return slots, exists


def _slot_positions(n, c, k, is_cot, spec: data.TaskSpec):
    """Sequence position of every slot of every example of one task, int32 [K, S]; -1 if absent."""
    K = spec.K
    # Which slots are present depends on n, c and is_cot only, not on the tokens.
    present, _ = data.slot_presence(n, c, is_cot, spec)
    present = present & (jnp.arange(K) < k)[:, None]
    flat = jnp.concatenate([jnp.ones((spec.prefix_len,), bool), present.reshape(-1)])
    # As `data._pack_left`: entry i goes to offset + (number of present entries up to i) - 1.
    dest = spec.seq_len - flat.sum() + jnp.cumsum(flat) - 1
    return jnp.where(flat, dest, -1)[spec.prefix_len :].reshape(present.shape).astype(jnp.int32)


def _task_positions(n, c, k, is_cot, spec: data.TaskSpec):
    slot_pos = _slot_positions(n, c, k, is_cot, spec)
    slots, exists = _slot_of_dag_index(c, spec)
    token_pos = jnp.where(exists, slot_pos[:, slots], -1)
    start = jnp.min(jnp.where(slot_pos >= 0, slot_pos, spec.seq_len), axis=1)
    return token_pos, start, slot_pos


def example_token_positions(batch: dict, spec: data.TaskSpec) -> jax.Array:
    """Position in `input_ids` of every DAG index of every example, int32 [B, K, N + C].

    Index i < N is input x_i, index N + j is chain token y_j (note: N, the maximum, not the task's
    n, so the layout is static). -1 where the token is not in the sequence: padding, i >= n,
    j >= c, examples >= k, and y_j (j < c-1) of a direct (non-CoT) example, which writes only its
    answer y_{c-1}. The position that predicts the token at p is p - 1.

    `batch` needs `n`, `c`, `k` [B] and `is_cot` [B, K] (as `data.sample_tasks`). Jittable.
    """
    fn = functools.partial(_task_positions, spec=spec)
    return jax.vmap(fn)(batch["n"], batch["c"], batch["k"], batch["is_cot"])[0]


def example_start_positions(batch: dict, spec: data.TaskSpec) -> jax.Array:
    """Position of the first token of every example, int32 [B, K] (seq_len beyond k)."""
    fn = functools.partial(_task_positions, spec=spec)
    return jax.vmap(fn)(batch["n"], batch["c"], batch["k"], batch["is_cot"])[1]


def _parent_positions(token_pos, adj, parent_mask, n, spec: data.TaskSpec):
    """Positions [B, K, C, M] of the parents of every chain token (-1 if masked or absent)."""
    # Reference convention (index < n: x_i, n + j: y_j) to ours (i, or N + j).
    index = jnp.where(adj < n[:, None, None], adj, spec.N + adj - n[:, None, None])
    index = jnp.clip(index, 0, spec.N + spec.C - 1)
    B, C, M = adj.shape
    gathered = jnp.take_along_axis(token_pos, index.reshape(B, 1, C * M), axis=2)
    return jnp.where(parent_mask[:, None], gathered.reshape(B, -1, C, M), -1)


# ---------------------------------------------------------------------------------------------
# DAG recovery from captured attention.


def dag_recovery_from_probs(
    probs: jax.Array, batch: dict, spec: data.TaskSpec
) -> dict[str, jax.Array]:
    """Sums and counts of the parent-attention scores of a batch (see the module docstring).

    Args:
      probs: float [layers, B, heads, L, L], attention probabilities (row = query position), as
        `model.apply(..., return_attention=True)` returns them for `batch["input_ids"]`.
      batch: `RECOVERY_FIELDS` minus the token fields: `n`, `c`, `k` [B], `is_cot` [B, K],
        `adj`, `parent_mask` [B, C, M] (as `data.sample_tasks`).
    Returns, for g in ("query", "demo"):
      `parent_mass_sum_{g}`, `parent_top_m_sum_{g}`: float32 [layers, heads], summed over the
      counted chain tokens; `count_{g}`: int32 [], the number of counted chain tokens.
    Jittable; combine batches with `combine_recovery_sums`, then `finalize_dag_recovery`.
    """
    N, C, K, L = spec.N, spec.C, spec.K, probs.shape[-1]
    fn = functools.partial(_task_positions, spec=spec)
    token_pos, start, _ = jax.vmap(fn)(batch["n"], batch["c"], batch["k"], batch["is_cot"])
    B = token_pos.shape[0]
    chain_pos = token_pos[:, :, N:]  # [B, K, C]
    parent_pos = _parent_positions(token_pos, batch["adj"], batch["parent_mask"], batch["n"], spec)
    pmask = batch["parent_mask"][:, None] & jnp.ones((1, K, 1, 1), bool)  # [B, K, C, M]
    all_written = jnp.all(~pmask | (parent_pos >= 0), axis=-1)
    counted = batch["is_cot"][:, :, None] & (chain_pos >= 1) & all_written & pmask.any(-1)
    example = jnp.arange(K)[None, :, None]
    last = (batch["k"] - 1)[:, None, None]
    groups = dict(query=counted & (example == last), demo=counted & (example < last))

    # Each counted token's predicting row, [layers, B, heads, R = K*C, L].
    predictor = jnp.maximum(chain_pos - 1, 0).reshape(B, K * C)
    rows = jnp.take_along_axis(probs, predictor[None, :, None, :, None], axis=3).astype(jnp.float32)
    flat_parents = parent_pos.reshape(B, K * C, -1)
    flat_pmask = pmask.reshape(B, K * C, -1)
    on_parents = jnp.take_along_axis(rows, jnp.maximum(flat_parents, 0)[None, :, None], axis=4)
    mass = jnp.where(flat_pmask[None, :, None], on_parents, 0.0).sum(-1)  # [layers, B, heads, R]

    # Top-m among the example's positions the row can attend to: start_e .. p - 1.
    t = jnp.arange(L)
    starts = jnp.repeat(start, C, axis=1)  # [B, R]
    candidate = (t[None, None] >= starts[..., None]) & (t[None, None] <= predictor[..., None])
    is_parent = jnp.any(
        (t[None, None, :, None] == flat_parents[:, :, None, :]) & flat_pmask[:, :, None, :], axis=-1
    )  # [B, R, L]
    weakest_parent = jnp.where(is_parent[None, :, None], rows, jnp.inf).min(-1)
    strongest_other = jnp.where((candidate & ~is_parent)[None, :, None], rows, -jnp.inf).max(-1)
    top_m = (weakest_parent > strongest_other).astype(jnp.float32)

    out = {}
    for name, selected in groups.items():
        weight = selected.reshape(B, K * C)[None, :, None].astype(jnp.float32)
        out[f"parent_mass_sum_{name}"] = (mass * weight).sum((1, 3))
        out[f"parent_top_m_sum_{name}"] = (top_m * weight).sum((1, 3))
        out[f"count_{name}"] = selected.sum(dtype=jnp.int32)
    return out


def combine_recovery_sums(sums: list[dict]) -> dict[str, np.ndarray]:
    """Adds the outputs of `dag_recovery_from_probs` over batches, on host in float64."""
    return {
        name: np.sum([np.asarray(s[name], np.float64) for s in sums], axis=0) for name in sums[0]
    }


def finalize_dag_recovery(sums: dict) -> dict[str, np.ndarray]:
    """Means over chain tokens: `parent_mass_{g}`, `parent_top_m_{g}` [layers, heads] (NaN where
    nothing was counted) and `count_{g}`, for g in ("query", "demo")."""
    out = {}
    for group in GROUPS:
        count = float(np.asarray(sums[f"count_{group}"]))
        for name in _SUM_NAMES:
            total = np.asarray(sums[f"{name}_sum_{group}"], np.float64)
            out[f"{name}_{group}"] = total / count if count else np.full(total.shape, np.nan)
        out[f"count_{group}"] = count
    return out


def flat_recovery_metrics(means: dict) -> dict[str, float]:
    """`finalize_dag_recovery`'s arrays as flat metric names (module docstring), plus `_best`."""
    metrics = {}
    for group in GROUPS:
        for name in _SUM_NAMES:
            grid = np.asarray(means[f"{name}_{group}"], np.float64)
            for (layer, head), value in np.ndenumerate(grid):
                metrics[f"{name}_{group}_L{layer}H{head}"] = float(value)
            metrics[f"{name}_{group}_best"] = (
                float("nan") if np.isnan(grid).all() else float(np.nanmax(grid))
            )
    return metrics


@functools.partial(jax.jit, static_argnames=("spec",))
def _recovery_step(graphdef, params, batch, spec: data.TaskSpec):
    _, probs = model.apply(
        graphdef,
        params,
        batch["input_ids"],
        batch["positions"],
        batch["attention_mask"],
        return_attention=True,
    )
    return dag_recovery_from_probs(probs, batch, spec)


def _layers_heads(params) -> tuple[int, int]:
    q_proj = jax.tree.leaves(params["layers"]["self_attn"]["q_proj"])[0]
    return q_proj.shape[0], q_proj.shape[2]


def _host(x) -> np.ndarray:
    """A (replicated or sharded) array as NumPy, also from a multi-host mesh."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x))
    return np.asarray(x)


def dag_recovery(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    eval_set: dict[str, np.ndarray],
    spec: data.TaskSpec,
    *,
    batch_size: int,
    n_tasks: int | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> dict[str, float]:
    """DAG-recovery metrics (flat names, module docstring) of the model on an eval set.

    Runs the first `n_tasks` tasks (default: all) in jitted batches of `batch_size`; the last batch
    is filled with copies of the last task that count nothing, so there is one compilation.
    The captured attention takes 4 * layers * batch_size * heads * seq_len**2 bytes: pick
    `batch_size` for that, not the eval batch size. Strategies without a chain in the sequence
    give NaN without running the model.
    """
    n_total = len(eval_set["k"])
    n_tasks = n_total if n_tasks is None else min(n_tasks, n_total)
    if n_tasks == 0:
        raise ValueError("the eval set is empty")
    if spec.prompt_strategy in ("standard", "standard_special_token"):
        layers, heads = _layers_heads(params)
        empty = np.full((layers, heads), np.nan)
        means = {f"{name}_{group}": empty for group in GROUPS for name in _SUM_NAMES}
        return flat_recovery_metrics(means)
    sums = []
    for start in range(0, n_tasks, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n_tasks - 1)
        batch = {name: np.asarray(eval_set[name])[rows] for name in RECOVERY_FIELDS}
        # Filler rows (copies of the last task) count nothing.
        real = np.arange(start, start + batch_size) < n_tasks
        batch["is_cot"] = batch["is_cot"] & real[:, None]
        out = _recovery_step(graphdef, params, jax.device_put(batch, batch_sharding), spec)
        sums.append(jax.tree.map(_host, out))
    return flat_recovery_metrics(finalize_dag_recovery(combine_recovery_sums(sums)))


# ---------------------------------------------------------------------------------------------
# Embeddings.


def _ridge_predict(x_train, y_train, x_test, ridge: float):
    """Ridge regression with an unpenalised bias, in float64, in the primal or dual form,
    whichever solves the smaller system. The penalty is `ridge` times the mean eigenvalue of the
    centred Gram matrix, so it does not depend on the scale of x."""
    x_mean, y_mean = x_train.mean(0), y_train.mean(0)
    x, y, x_test = x_train - x_mean, y_train - y_mean, x_test - x_mean
    n, dims = x.shape
    lam = ridge * max(np.trace(x.T @ x) / dims, np.finfo(np.float64).tiny)
    if dims <= n:
        weights = np.linalg.solve(x.T @ x + lam * np.eye(dims), x.T @ y)
    else:
        weights = x.T @ np.linalg.solve(x @ x.T + lam * np.eye(n), y)
    return x_test @ weights + y_mean


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) between x [n, p] and y [n, q] (rows = the same items):
    ||Ycᵀ Xc||² / (||Xcᵀ Xc|| ||Ycᵀ Yc||), Frobenius norms of the centred matrices. In [0, 1];
    invariant to orthogonal transforms and isotropic scaling, not to general linear maps."""
    x = np.asarray(x, np.float64) - np.mean(x, 0)
    y = np.asarray(y, np.float64) - np.mean(y, 0)
    cross = np.linalg.norm(y.T @ x) ** 2
    denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / denom) if denom > 0 else float("nan")


# Relative ridge penalties `embedding_probe` chooses from by cross-validation.
RIDGE_GRID = tuple(10.0 ** np.arange(-6, 4))


def embedding_probe(
    model_embeddings,
    data_embeddings,
    usable_vocab_size: int,
    *,
    holdout_fraction: float = 0.25,
    ridges: tuple[float, ...] = RIDGE_GRID,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """How well the data embeddings E are linearly recoverable from the model's embeddings.

    Args:
      model_embeddings: [V, D], the model's token embedding table (`embed_tokens`).
      data_embeddings: [V, d], the run's E (`world["embeddings"]`).
      usable_vocab_size: only ids below it (never the reserved ones) are used.
      holdout_fraction: share of the usable ids held out for the R² (a fixed split from `seed`).
      ridges: relative ridge penalties (see `_ridge_predict`; the bias is not penalised); the
        one with the least `folds`-fold cross-validated error on the other ids is used. A fixed
        small penalty overfits when there are fewer ids than model dimensions.
    Returns:
      embed_probe_r2: 1 - SSE/SST on the held-out ids, SSE and SST summed over all d output
        dimensions, SST around the held-out mean. 1 for a perfect probe; about 0 for none.
      embed_probe_ridge: the chosen relative penalty.
      embed_cka: linear CKA between the two tables over all usable ids.
    Small (V x D), so it runs on host in float64, where the solves are exact.
    """
    x = np.asarray(model_embeddings, np.float64)[:usable_vocab_size]
    y = np.asarray(data_embeddings, np.float64)[:usable_vocab_size]
    n_test = int(round(holdout_fraction * usable_vocab_size))
    if not 1 <= n_test < usable_vocab_size - 1:
        raise ValueError(
            f"holdout_fraction={holdout_fraction} leaves no train or test ids out of "
            f"{usable_vocab_size}"
        )
    order = np.random.default_rng(seed).permutation(usable_vocab_size)
    test, train = order[:n_test], order[n_test:]
    folds = min(folds, len(train))
    fold_of = np.arange(len(train)) % folds

    def cv_error(ridge):
        error = 0.0
        for fold in range(folds):
            fit, held = train[fold_of != fold], train[fold_of == fold]
            error += np.sum((y[held] - _ridge_predict(x[fit], y[fit], x[held], ridge)) ** 2)
        return error

    ridge = min(ridges, key=cv_error)  # ties: the first, so list small penalties first
    predicted = _ridge_predict(x[train], y[train], x[test], ridge)
    sse = np.sum((y[test] - predicted) ** 2)
    sst = np.sum((y[test] - y[test].mean(0)) ** 2)
    return dict(
        embed_probe_r2=float(1.0 - sse / sst),
        embed_probe_ridge=float(ridge),
        embed_cka=linear_cka(x, y),
    )


def embedding_metrics(
    params: nnx.State, world: dict, spec: data.TaskSpec, **probe_kwargs
) -> dict[str, float]:
    """`embedding_probe` of the model's input embedding table (`params["embed_tokens"]`) against
    the run's data embeddings `world["embeddings"]`."""
    table = jax.tree.leaves(params["embed_tokens"])[0]
    return embedding_probe(
        _host(table), _host(world["embeddings"]), spec.usable_vocab_size, **probe_kwargs
    )


# ---------------------------------------------------------------------------------------------
# Token coverage.


@functools.partial(jax.jit, static_argnames=("spec", "n_tasks"), donate_argnames=("seen",))
def _mark_chain_tokens(seen, world, key, task_ids, spec: data.TaskSpec, n_tasks: int):
    chain = data.eval_tasks(world, key, task_ids, spec, n_tasks)["chain"]  # [B, K, C]
    valid = (chain >= 0) & (task_ids < n_tasks)[:, None, None]
    # Invalid entries are sent out of bounds and dropped.
    return seen.at[jnp.where(valid, chain, spec.vocab_size)].set(True, mode="drop")


def token_coverage(
    world: dict, key: jax.Array, spec: data.TaskSpec, n_tasks: int, chunk_size: int = 1024
) -> float:
    """Distinct chain tokens over `n_tasks` tasks, divided by `spec.usable_vocab_size`.

    The tasks are those of `data.eval_tasks(world, key, range(n_tasks), spec, n_tasks)` (e.g. the
    eval set with the run's eval key); every valid chain token of every example counts, written
    in the sequence or not. Needs no model, so it is known before training. Chunks of
    `chunk_size` tasks (the last padded, one compilation) mark an on-device bitmap [V].
    """
    seen = jnp.zeros((spec.vocab_size,), bool)
    for start in range(0, n_tasks, chunk_size):
        ids = jnp.arange(start, start + chunk_size, dtype=jnp.int32)
        seen = _mark_chain_tokens(seen, world, key, ids, spec, n_tasks)
    return int(seen.sum()) / spec.usable_vocab_size


def eval_set_coverage(eval_set: dict[str, np.ndarray], spec: data.TaskSpec) -> float:
    """`token_coverage` of tasks already sampled (an eval set's `chain` field), on the host."""
    chain = np.asarray(eval_set["chain"])
    return len(np.unique(chain[chain >= 0])) / spec.usable_vocab_size


# ---------------------------------------------------------------------------------------------
# Figures.


def _recovery_grid(metrics: dict, name: str, group: str) -> np.ndarray:
    pattern = re.compile(rf"{name}_{group}_L(\d+)H(\d+)$")
    cells = {
        tuple(map(int, m.groups())): value
        for key, value in metrics.items()
        if (m := pattern.match(key))
    }
    if not cells:
        raise ValueError(f"no {name}_{group}_L*H* metrics")
    layers, heads = (max(index[i] for index in cells) + 1 for i in (0, 1))
    grid = np.full((layers, heads), np.nan)
    for (layer, head), value in cells.items():
        grid[layer, head] = value
    return grid


def plot_dag_recovery_heatmap(metrics: dict, path: str, which: str = "query") -> None:
    """Layers x heads heat maps of parent mass and top-m exact, side by side, for `which` in
    ("query", "demo"), from flat metrics (as `dag_recovery` returns, or logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = [
        (_recovery_grid(metrics, name, which), title)
        for name, title in (
            ("parent_mass", "attention mass on DAG parents"),
            ("parent_top_m", "top-m attended = parents"),
        )
    ]
    layers, heads = grids[0][0].shape
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * (2 + 0.5 * heads), 1.5 + 0.5 * layers), squeeze=False
    )
    for ax, (grid, title) in zip(axes[0], grids, strict=True):
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        if layers * heads <= 256:
            for (layer, head), value in np.ndenumerate(grid):
                ax.text(
                    head,
                    layer,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if not value > 0.6 else "black",
                )
        ax.set(
            title=f"{which}: {title}",
            xlabel="head",
            ylabel="layer",
            xticks=range(heads),
            yticks=range(layers),
        )
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@functools.partial(jax.jit, static_argnames=("spec",))
def _attention_and_recovery(graphdef, params, batch, spec: data.TaskSpec):
    _, probs = model.apply(
        graphdef,
        params,
        batch["input_ids"],
        batch["positions"],
        batch["attention_mask"],
        return_attention=True,
    )
    return probs, dag_recovery_from_probs(probs, batch, spec)


def _slot_labels(spec: data.TaskSpec, c: int) -> list[str]:
    N, C = spec.N, spec.C
    return (
        ["<in_s>"]
        + [f"x{i}" for i in range(N)]
        + ["<in_e>", "<think_s>"]
        + [f"y{j}" for j in range(C - 1)]
        + ["<think_e>", "<ans_s>", f"y{c - 1}", "<ans_e>", "<eos>"]
    )


def plot_query_attention(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    task_batch: dict,
    spec: data.TaskSpec,
    path: str,
    task: int = 0,
    layer: int | None = None,
    head: int | None = None,
) -> tuple[int, int]:
    """The query example's attention in one layer and head, with the true DAG parents marked.

    Rows: the positions that predict the query example's written chain tokens (labelled `→y_j`);
    columns: the query example's tokens (x_i, y_j, markers). A red square marks each row's
    parents. `task_batch` holds `RECOVERY_FIELDS` for one or more tasks (e.g. the eval set);
    `task` picks one. `layer`/`head` default to those with the most parent mass on this task's
    query example (the demonstrations if it has none). Returns the (layer, head) drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    batch = {name: np.asarray(task_batch[name])[task : task + 1] for name in RECOVERY_FIELDS}
    probs, sums = _attention_and_recovery(graphdef, params, batch, spec)
    probs = np.asarray(probs)[:, 0]  # [layers, heads, L, L]
    means = finalize_dag_recovery(jax.tree.map(np.asarray, sums))
    score = means["parent_mass_query"] if means["count_query"] else means["parent_mass_demo"]
    score = np.nan_to_num(score, nan=-1.0)
    if layer is None and head is None:
        layer, head = np.unravel_index(np.argmax(score), score.shape)
    elif layer is None:
        layer = np.argmax(score[:, head])
    elif head is None:
        head = np.argmax(score[layer])
    layer, head = int(layer), int(head)

    n, c, k = (int(batch[name][0]) for name in ("n", "c", "k"))
    token_pos, _, slot_pos = (
        np.asarray(a)
        for a in _task_positions(
            batch["n"][0], batch["c"][0], batch["k"][0], batch["is_cot"][0], spec
        )
    )
    query_slots = slot_pos[k - 1]
    columns = np.flatnonzero(query_slots >= 0)
    column_pos = query_slots[columns]
    labels = _slot_labels(spec, c)
    column_labels = [labels[s] for s in columns]
    chain_pos = token_pos[k - 1, spec.N : spec.N + c]
    row_chain = [j for j in range(c) if chain_pos[j] >= 1]
    row_pos = [chain_pos[j] - 1 for j in row_chain]
    matrix = probs[layer, head][np.ix_(row_pos, column_pos)]
    # Blank (not 0) where the row cannot attend: tokens after the predicting position.
    matrix = np.ma.masked_where(column_pos[None, :] > np.asarray(row_pos)[:, None], matrix)

    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * len(columns), 2.0 + 0.45 * len(row_pos)))
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.85")
    image = ax.imshow(
        matrix, vmin=0.0, vmax=max(float(matrix.max()), 1e-6), cmap=cmap, aspect="auto"
    )
    adj, parent_mask = batch["adj"][0], batch["parent_mask"][0]
    for row, j in enumerate(row_chain):
        for parent in adj[j][parent_mask[j]]:
            index = parent if parent < n else spec.N + parent - n
            where = np.flatnonzero(column_pos == token_pos[k - 1, index])
            for col in where:
                ax.add_patch(
                    Rectangle(
                        (col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2
                    )
                )
    ax.set_xticks(range(len(columns)), column_labels, rotation=90)
    ax.set_yticks(range(len(row_pos)), [f"→y{j}" for j in row_chain])
    ax.set(
        xlabel="attended token (query example)",
        ylabel="predicting position",
        title=f"task {task}, query example, layer {layer}, head {head} (red: DAG parents)",
    )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return layer, head
