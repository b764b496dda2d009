"""One-shot structured pruning of the lab's Llama: OSSCAR (Meng et al., ICML 2024, "OSSCAR:
One-Shot Structured Pruning in Vision and Language Models with Combinatorial Optimization",
arXiv 2403.12983), with magnitude pruning as the baseline.

    result = prune_params(config, graphdef, state, batch, mlp_keep=0.5, heads_keep=0.5)
    result.config, result.graphdef, result.state   # a normal, smaller LlamaConfig and its model
    result.report                                  # per layer: kept units, errors, timings

A run's checkpoint, pruned and written as a Hugging Face Llama directory (with
`prune_report.json`), which `python -m cotlab_jax.export --import_hf=OUT --task_workdir=RUN`
evaluates on the run's eval set:

    python -m cotlab_jax.prune --workdir=RUN --out=OUT [--mlp_keep=0.5] [--heads_keep=0.5]
        [--head_units=query_heads|kv_groups] [--method=osscar|magnitude|magnitude_refit]
        [--calibration_tasks=128] [--step=latest]

The result is a dense model of the same architecture with fewer MLP neurons
(`intermediate_size`) and/or fewer attention heads, so training, evaluation and
`cotlab_jax.hf_convert` take it like any other. Layers are stacked on one axis, so every layer
keeps the same number of units (each layer its own subset).

The layer-wise problem
----------------------
A structure is a group of input rows of one output projection: an MLP neuron j is row j of
`down_proj` (its gate/up columns go with it), an attention head is its `head_dim` rows of
`o_proj`. With X [n, m] the projection's inputs on the calibration tokens (padding excluded),
W0 [m, d] its dense weights and S the kept rows, the pruned layer should reproduce the dense
output X W0:

    min_W  1/2 ||X W - X W0||^2 + mu/2 ||W - W0||^2      with W = 0 outside S,

mu = ridge * mean(diag(X^T X)) (the authors' code: lambda2 = 1e-2, ridge towards the dense
weights). Only the Gram matrix G = X^T X + mu I and the cross term C = G W0 enter (the paper's
reduced form, whose size does not grow with n): up to a constant the objective is
f(W) = 1/2 tr(W^T G W) - tr(W^T C), minimised on S by the closed-form refit
W_S = G_SS^{-1} C_S, where f(S) = -1/2 tr(W_S^T C_S).

The search (float64, NumPy: the authors also solve in float64)
--------------------------------------------------------------
The state for a support S is P = (G_SS)^{-1} (zero-padded to m x m), T = P G, the refit W = P C
and the residual R = C - G W. Removing a set of rows Q from S costs exactly
1/2 tr(W_Q^T (P_QQ)^{-1} W_Q) (for one neuron ||W_j||^2 / (2 P_jj), the OBS formula); adding
rows A gains exactly 1/2 tr(R_A^T (G_AA - G_A: T_:A)^{-1} R_A). Both change P, T, W, R by a
low-rank (Woodbury / Schur-complement) update of rank |Q| or |A|, O(m^2 |Q|), never a new
inverse.

1. Backward selection (the paper's multi-unit greedy, `OSSCAR_fastprune` in the authors' code):
   start from all units (P = G^{-1}, W = W0), and in `backward_steps` rounds remove the units
   of smallest removal cost, refitting after each round by the low-rank update.
2. Local search (the paper's swap search, `OSSCAR_local_search`): remove the t kept units of
   smallest removal cost, then add the t pruned units of largest gain (the gains recomputed for
   the support after the removal, also by low-rank algebra), and accept the swap if it lowers the
   objective. The exact change of the whole swap is computed from rank-t quantities before
   anything is committed, so a rejected swap costs O(m t (t + d)) and changes nothing. On a
   rejection t halves; the search stops at a rejected 1-swap or after `local_search_iters`.
3. The kept weights are refit in closed form (a fresh solve on G_SS, not the running update).

Attention heads and grouped-query attention
-------------------------------------------
The inputs of `o_proj` are the heads' attention outputs, so a head's rows are one unit of
`head_dim` rows and the same search runs with block (`head_dim` x `head_dim`) costs. Pruned
heads lose their q_proj columns and o_proj rows. GQA has two valid choices, `head_units`:
  - "query_heads" (default): prune query heads, the same number in every KV group, so the
    model keeps all its KV heads (the KV cache is unchanged) and each kept query head still
    reads its own KV head. Backward steps and swaps run within each group.
  - "kv_groups": prune whole KV groups (a KV head with all its query heads; a unit of
    group_size * head_dim rows), removing k_proj/v_proj heads as well, which also shrinks
    the KV cache.
Attention is pruned before the MLP of the same layer, whose calibration inputs then come from
the pruned attention.

Calibration (JAX)
-----------------
Layer by layer, as the authors' "sequential" mode: each layer's inputs are the outputs of the
already pruned layers below it. Head outputs come from the model's own `Attention` module with
an identity `o_proj` (so they are exactly what the model computes), the MLP's hidden
activations silu(x W_gate) * (x W_up) from its weights; the Gram matrices accumulate in float32
over chunks of tasks.

Magnitude baseline
------------------
`method="magnitude"` keeps the units whose rows of the output projection (down_proj row,
o_proj head block) have the largest L2 norm and keeps their weights unchanged (the authors' MP
ranks by the L1 norm); `"magnitude_refit"` refits those rows in closed form (their MP+).

Differences from the paper and the authors' code
------------------------------------------------
- The local search commits a swap only after its exact objective change is known from low-rank
  terms (the authors remove, then add, then re-invert G_SS and compare), and a just-removed unit
  is not re-added in the same swap; t halves on a rejection (their default stops).
- One kept fraction for all layers (stacked layers need one shape); the paper may vary it.
- The q/k/v and gate/up projections of kept units are not refit (as in the paper).
"""

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from cotlab_jax import cli_errors, data, experiment, export, model, rundir
from cotlab_jax.config import ConfigError

METHODS = ("osscar", "magnitude", "magnitude_refit")
HEAD_UNITS = ("query_heads", "kv_groups")


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """OSSCAR's knobs. `ridge` is relative to the mean diagonal of X^T X; `swap_size=None`
    means max(1, units // 512); `backward_steps` rounds of removals; at most
    `local_search_iters` swap attempts."""

    ridge: float = 1e-2
    backward_steps: int = 10
    local_search_iters: int = 50
    swap_size: int | None = None

    def __post_init__(self):
        if not (
            isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge > 0
        ):
            raise ConfigError(f"prune ridge={self.ridge!r} is invalid: expected a positive number")
        for name in ("backward_steps", "local_search_iters"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= (1 if name == "backward_steps" else 0)):
                raise ConfigError(
                    f"prune {name}={value!r} is invalid: expected an integer "
                    f">= {1 if name == 'backward_steps' else 0}"
                )
        if self.swap_size is not None and not (
            isinstance(self.swap_size, int) and self.swap_size >= 1
        ):
            raise ConfigError(
                f"prune swap_size={self.swap_size!r} is invalid: expected a "
                "positive integer or None"
            )


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """One projection's pruning: the kept units (sorted), their refit rows [kept * unit, d], and
    `stats` (relative_error = ||X W - X W0||^2 / ||X W0||^2 on the calibration tokens, the
    reduced objective, search counts, seconds)."""

    kept: np.ndarray
    weight: np.ndarray
    stats: dict


@dataclasses.dataclass(frozen=True)
class PruneResult:
    config: model.LlamaConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    report: dict


# ---------------------------------------------------------------------------------------------
# The layer-wise problem in reduced form (NumPy, float64).


def ridge_strength(gram: np.ndarray, ridge: float) -> float:
    """mu = ridge * mean(diag(X^T X))."""
    return ridge * float(np.mean(np.diag(gram)))


def regularised_gram(gram: np.ndarray, ridge: float) -> np.ndarray:
    """G = X^T X + mu I (float64)."""
    gram = np.asarray(gram, np.float64)
    return gram + ridge_strength(gram, ridge) * np.eye(gram.shape[0])


def _columns(units: np.ndarray, unit_size: int) -> np.ndarray:
    units = np.asarray(units, np.int64)
    return (units[:, None] * unit_size + np.arange(unit_size)).reshape(-1)


def refit(gram_reg: np.ndarray, cross: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The closed-form minimiser on the kept rows: G_SS^{-1} C_S."""
    return np.linalg.solve(gram_reg[np.ix_(columns, columns)], cross[columns])


def reduced_objective(gram_reg, cross, columns, weight) -> float:
    """f(W) = 1/2 tr(W^T G W) - tr(W^T C) for W nonzero only on `columns`."""
    gram_sub = gram_reg[np.ix_(columns, columns)]
    return float(0.5 * np.sum(weight * (gram_sub @ weight)) - np.sum(weight * cross[columns]))


def relative_error(
    gram: np.ndarray, dense: np.ndarray, columns, weight, gram_dense: np.ndarray | None = None
) -> float:
    """||X W - X W0||^2 / ||X W0||^2 from the raw Gram X^T X (W zero outside `columns`);
    `gram_dense` = X^T X W0 if already known."""
    gram = np.asarray(gram, np.float64)
    dense = np.asarray(dense, np.float64)
    if gram_dense is None:
        gram_dense = gram @ dense
    delta = -dense.copy()
    delta[columns] += weight
    gram_delta = gram[:, columns] @ weight - gram_dense
    return float(np.sum(delta * gram_delta) / np.sum(dense * gram_dense))


def _diagonal_blocks(matrix: np.ndarray, units: np.ndarray, unit_size: int) -> np.ndarray:
    """The [len(units), u, u] diagonal blocks of `matrix` at `units`."""
    cols = _columns(units, unit_size).reshape(len(units), unit_size)
    return matrix[cols[:, :, None], cols[:, None, :]]


def _block_quadratic(blocks: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """1/2 tr(r_a^T blocks_a^{-1} r_a) per unit a; rows [units, u, d]."""
    if blocks.shape[1] == 1:
        return 0.5 * np.sum(rows[:, 0] ** 2, axis=1) / blocks[:, 0, 0]
    return 0.5 * np.einsum("aud,aud->a", rows, np.linalg.solve(blocks, rows))


class Support:
    """The refit state of a support S (see the module docstring): P, T = P G, W = P C and the
    residual R = C - G W, all float64, kept exact under removals and additions by low-rank
    updates. `objective` is f(S) = -1/2 tr(W^T C).

    T and R serve only additions: `remove(..., search_terms=False)` skips them (the backward
    pass) and `refresh_search_terms` computes them afresh for the current support."""

    def __init__(self, gram_reg: np.ndarray, cross: np.ndarray, unit_size: int, weight=None):
        self.G, self.C, self.u = gram_reg, cross, unit_size
        self.n_units = gram_reg.shape[0] // unit_size
        self.kept = np.ones(self.n_units, bool)
        self.P = np.linalg.inv(gram_reg)
        self.P = 0.5 * (self.P + self.P.T)
        self.W = self.P @ cross if weight is None else np.array(weight, np.float64)
        self.T = self.R = None
        self.objective = -0.5 * float(np.sum(self.W * cross))

    def refresh_search_terms(self) -> None:
        s = _columns(np.flatnonzero(self.kept), self.u)
        self.T = np.zeros_like(self.G)
        self.T[s] = self.P[np.ix_(s, s)] @ self.G[s]
        self.R = self.C - self.G[:, s] @ self.W[s]

    def removal_costs(self) -> np.ndarray:
        """Exact objective increase of removing each kept unit alone (inf for pruned ones)."""
        costs = np.full(self.n_units, np.inf)
        units = np.flatnonzero(self.kept)
        rows = self.W[_columns(units, self.u)].reshape(len(units), self.u, -1)
        costs[units] = _block_quadratic(_diagonal_blocks(self.P, units, self.u), rows)
        return costs

    def _schur_blocks(self, units: np.ndarray) -> np.ndarray:
        """G_aa - G_a: T_:a per unit a outside S."""
        cols = _columns(units, self.u)
        g_rows = self.G[cols].reshape(len(units), self.u, -1)
        t_cols = self.T[:, cols].T.reshape(len(units), self.u, -1)
        return _diagonal_blocks(self.G, units, self.u) - np.einsum("aum,avm->auv", g_rows, t_cols)

    def swap_change(self, remove: np.ndarray, candidates: np.ndarray, partitions, counts):
        """Remove `remove`, then pick the best `counts[p]` units of `candidates` per partition
        for the support after the removal; returns (units to add, exact objective change)."""
        rc = _columns(remove, self.u)
        inv_block = np.linalg.inv(self.P[np.ix_(rc, rc)])
        t_removed = self.T[rc]  # [r, m]: G P_:R, the coupling of every row to the removed ones
        k_t = inv_block @ t_removed
        k_w = inv_block @ self.W[rc]
        removal_cost = 0.5 * float(np.sum(self.W[rc] * k_w))
        cc = _columns(candidates, self.u)
        n, u = len(candidates), self.u
        schur = self._schur_blocks(candidates) + np.einsum(
            "rau,rav->auv", t_removed[:, cc].reshape(-1, n, u), k_t[:, cc].reshape(-1, n, u)
        )
        residual = self.R[cc] + t_removed[:, cc].T @ k_w
        gains = _block_quadratic(schur, residual.reshape(n, u, -1))
        add = _pick(gains, candidates, partitions, counts, largest=True)
        ac = _columns(add, self.u)
        joint_schur = (
            self.G[np.ix_(ac, ac)] - self.G[ac] @ self.T[:, ac] + t_removed[:, ac].T @ k_t[:, ac]
        )
        joint_residual = self.R[ac] + t_removed[:, ac].T @ k_w
        gain = 0.5 * float(np.sum(joint_residual * np.linalg.solve(joint_schur, joint_residual)))
        return add, removal_cost - gain

    def remove(self, units: np.ndarray, search_terms: bool = True) -> None:
        c = _columns(units, self.u)
        p_cols = self.P[:, c]
        inv_block = np.linalg.inv(self.P[np.ix_(c, c)])
        w_rows = self.W[c]
        self.objective += 0.5 * float(np.sum(w_rows * (inv_block @ w_rows)))
        scaled = p_cols @ inv_block
        if search_terms:
            self.R += self.T[c].T @ (inv_block @ w_rows)
            self.T -= scaled @ self.T[c]
            self.T[c] = 0.0
        self.W -= scaled @ w_rows
        self.P -= scaled @ p_cols.T
        self.P[c], self.P[:, c], self.W[c] = 0.0, 0.0, 0.0
        self.kept[units] = False

    def add(self, units: np.ndarray) -> None:
        c = _columns(units, self.u)
        v = self.T[:, c].copy()  # P G_:A, zero on the rows outside S
        schur = self.G[np.ix_(c, c)] - self.G[c] @ v
        schur_inv = np.linalg.inv(schur)
        v[c] = -np.eye(len(c))
        g_v = self.T.T @ self.G[:, c] - self.G[:, c]  # G V
        r_rows = self.R[c].copy()
        self.objective -= 0.5 * float(np.sum(r_rows * (schur_inv @ r_rows)))
        scaled = v @ schur_inv
        self.P += scaled @ v.T
        self.T += scaled @ g_v.T
        self.W -= scaled @ r_rows
        self.R += g_v @ (schur_inv @ r_rows)
        self.kept[units] = True


def _pick(scores, eligible_units, partitions, counts, largest: bool) -> np.ndarray:
    """Per partition p, the `counts[p]` eligible units of smallest (largest) score; sorted."""
    picked = []
    for p, count in enumerate(counts):
        if count == 0:
            continue
        mask = partitions[eligible_units] == p
        units, unit_scores = eligible_units[mask], scores[mask]
        order = np.argsort(-unit_scores if largest else unit_scores, kind="stable")
        picked.append(units[order[:count]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def _even_split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def osscar_search(
    gram_reg, cross, unit_size, keep_per_partition, partitions, options: SearchOptions, dense=None
) -> tuple[np.ndarray, dict]:
    """OSSCAR's kept units (sorted) for the reduced problem (G, C) and search statistics.
    `dense`: the full-support minimiser G^{-1} C where known (the dense weights when C = G W0)."""
    start = time.perf_counter()
    state = Support(gram_reg, cross, unit_size, dense)
    init_seconds = time.perf_counter() - start
    n_parts = len(keep_per_partition)
    to_remove = [int(np.sum(partitions == p)) - keep_per_partition[p] for p in range(n_parts)]
    steps = max(1, min(options.backward_steps, max(to_remove)))
    per_step = [_even_split(total, steps) for total in to_remove]
    for step in range(steps):
        counts = [per_step[p][step] for p in range(n_parts)]
        costs = state.removal_costs()
        state.remove(
            _pick(costs[state.kept], np.flatnonzero(state.kept), partitions, counts, largest=False),
            search_terms=False,
        )
    backward_objective = state.objective
    state.refresh_search_terms()
    backward_seconds = time.perf_counter() - start - init_seconds

    swap = options.swap_size or max(1, state.n_units // 512)
    iters = accepted = 0
    while iters < options.local_search_iters:
        kept_units, pruned_units = np.flatnonzero(state.kept), np.flatnonzero(~state.kept)
        counts = [
            min(
                swap,
                int(np.sum(partitions[kept_units] == p)),
                int(np.sum(partitions[pruned_units] == p)),
            )
            for p in range(n_parts)
        ]
        if not any(counts):
            break
        iters += 1
        costs = state.removal_costs()
        remove = _pick(costs[kept_units], kept_units, partitions, counts, largest=False)
        add, change = state.swap_change(remove, pruned_units, partitions, counts)
        if change < -1e-10 * max(abs(state.objective), 1e-30):
            state.remove(remove)
            state.add(add)
            accepted += 1
        elif swap == 1:
            break
        else:
            swap = max(1, swap // 2)
    kept = np.flatnonzero(state.kept)
    stats = dict(
        backward_objective=backward_objective,
        search_objective=state.objective,
        local_search_iters=iters,
        swaps_accepted=accepted,
        inverse_seconds=init_seconds,
        backward_seconds=backward_seconds,
        local_search_seconds=time.perf_counter() - start - init_seconds - backward_seconds,
        search_weight=state.W[_columns(kept, unit_size)],
    )
    return kept, stats


def magnitude_units(dense: np.ndarray, unit_size: int, keep_per_partition, partitions):
    """Per partition, the units whose rows of `dense` have the largest L2 norm; sorted."""
    norms = np.linalg.norm(np.asarray(dense, np.float64).reshape(len(partitions), -1), axis=1)
    return _pick(norms, np.arange(len(partitions)), partitions, keep_per_partition, largest=True)


def prune_layer(
    gram,
    dense,
    keep_per_partition,
    unit_size: int = 1,
    partitions=None,
    method: str = "osscar",
    options: SearchOptions = SearchOptions(),
) -> LayerResult:
    """Prunes one output projection: `dense` W0 [m, d] whose inputs X have the raw Gram
    `gram` = X^T X [m, m]; units are `unit_size` consecutive rows, `partitions[unit]` (default
    all 0) a group id, and `keep_per_partition[p]` units of partition p are kept."""
    if method not in METHODS:
        raise ConfigError(f"prune method={method!r} is invalid: expected one of {METHODS}")
    start = time.perf_counter()
    gram = np.asarray(gram, np.float64)
    dense = np.asarray(dense, np.float64)
    n_units = gram.shape[0] // unit_size
    partitions = np.zeros(n_units, np.int64) if partitions is None else np.asarray(partitions)
    keep_per_partition = [int(k) for k in keep_per_partition]
    sizes = np.bincount(partitions, minlength=len(keep_per_partition))
    if not all(1 <= k <= size for k, size in zip(keep_per_partition, sizes, strict=True)):
        raise ConfigError(
            f"prune keep_per_partition={keep_per_partition} is invalid: expected "
            f"between 1 and the partition sizes {sizes.tolist()}"
        )
    gram_reg = regularised_gram(gram, options.ridge)
    gram_dense = gram @ dense
    cross = gram_dense + ridge_strength(gram, options.ridge) * dense  # G W0
    stats = dict(method=method)
    if method == "osscar":
        kept, search = osscar_search(
            gram_reg, cross, unit_size, keep_per_partition, partitions, options, dense
        )
        stats.update({k: v for k, v in search.items() if k != "search_weight"})
    else:
        kept = magnitude_units(dense, unit_size, keep_per_partition, partitions)
    columns = _columns(kept, unit_size)
    weight = dense[columns] if method == "magnitude" else refit(gram_reg, cross, columns)
    stats.update(
        objective=reduced_objective(gram_reg, cross, columns, weight),
        relative_error=relative_error(gram, dense, columns, weight, gram_dense),
        solve_seconds=time.perf_counter() - start,
    )
    return LayerResult(kept=kept, weight=weight, stats=stats)


# ---------------------------------------------------------------------------------------------
# Calibration activations, layer by layer (JAX).


def calibration_batch(run_config, n_tasks: int, seed: int = 0) -> dict[str, jax.Array]:
    """`n_tasks` training-distribution tasks of run config `run_config` (its world, so its
    token embeddings), drawn by `data.sample_batch` from key `seed` (not the run's training
    stream): input_ids, attention_mask, positions."""
    spec = data.TaskSpec.from_config(run_config)
    world = data.make_world(data.root_keys(run_config.seed)["world"], spec)
    batch = data.sample_batch(world, jax.random.key(seed), 0, spec, n_tasks)
    return {name: batch[name] for name in ("input_ids", "attention_mask", "positions")}


def _with_identity_o_proj(layer_state):
    """The layer with o_proj replaced by an identity [heads, head_dim, heads * head_dim], so
    the attention module returns its heads' outputs side by side instead of projecting them."""

    def swap(path, leaf):
        if "o_proj" not in jax.tree_util.keystr(path):
            return leaf
        heads, head_dim, _ = leaf.shape
        return jnp.eye(heads * head_dim, dtype=leaf.dtype).reshape(heads, head_dim, -1)

    return jax.tree_util.tree_map_with_path(swap, layer_state)


@jax.jit
def _attention_heads(layers_graphdef, layer_state, x, positions, mask):
    """The attention heads' outputs [B, L, heads * head_dim] for layer inputs x [B, L, D]."""
    block = nnx.merge(layers_graphdef, _with_identity_o_proj(layer_state))
    heads, _, _ = block.self_attn(
        block.input_layernorm(x), positions, mask, None, 0, return_attention=False, cpu=False
    )
    return heads


@jax.jit
def _mlp_hidden(layers_graphdef, layer_state, x, gate, up):
    """The MLP's hidden activations silu(n(x) gate) * (n(x) up) with the given gate/up."""
    block = nnx.merge(layers_graphdef, layer_state)
    normed = block.post_attention_layernorm(x)
    dtype = x.dtype
    return jax.nn.silu(jnp.einsum("bld,dm->blm", normed, gate.astype(dtype))) * jnp.einsum(
        "bld,dm->blm", normed, up.astype(dtype)
    )


@jax.jit
def _gram_update(gram, inputs, weights):
    """gram + X^T X over the real tokens; inputs [B, L, m], weights [B, L] (0 on padding)."""
    flat = inputs.reshape(-1, inputs.shape[-1]).astype(jnp.float32)
    weighted = flat * weights.reshape(-1, 1).astype(jnp.float32)
    return gram + jnp.einsum("nm,nk->mk", weighted, flat, preferred_element_type=jnp.float32)


@jax.jit
def _project_residual(x, inputs, weight):
    """x + inputs @ weight (the pruned sub-block's contribution to the residual stream)."""
    return x + jnp.einsum("blm,md->bld", inputs, weight.astype(x.dtype))


def _seconds_until_ready(start: float, array) -> float:
    jax.block_until_ready(array)
    return time.perf_counter() - start


def _chunks(n: int, size: int):
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _keep_count(fraction: float, total: int, field: str) -> int:
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ConfigError(f"prune {field}={fraction!r} is invalid: expected a fraction in (0, 1]")
    count = round(fraction * total)
    if count < 1:
        raise ConfigError(
            f"prune {field}={fraction!r} is invalid: it keeps none of the "
            f"{total} units; expected at least 1 / {total}"
        )
    return count


def _head_plan(config: model.LlamaConfig, heads_keep: float, head_units: str):
    """(unit_size, partitions, keep_per_partition, new heads, new KV heads) for the heads."""
    if head_units not in HEAD_UNITS:
        raise ConfigError(
            f"prune head_units={head_units!r} is invalid: expected one of {HEAD_UNITS}"
        )
    kv, hd = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // kv
    if head_units == "query_heads":
        per_group = _keep_count(heads_keep, group, "heads_keep (query heads per KV group)")
        return hd, np.repeat(np.arange(kv), group), [per_group] * kv, per_group * kv, kv
    groups = _keep_count(heads_keep, kv, "heads_keep (KV groups)")
    return group * hd, np.zeros(kv, np.int64), [groups], groups * group, groups


def check_arguments(config: model.LlamaConfig, mlp_keep, heads_keep, method: str, head_units: str):
    """Raises `ConfigError` naming a bad argument; returns the MLP's kept count (None: not
    pruned) and the heads' plan."""
    if method not in METHODS:
        raise ConfigError(f"prune method={method!r} is invalid: expected one of {METHODS}")
    n_mlp = (
        None if mlp_keep is None else _keep_count(mlp_keep, config.intermediate_size, "mlp_keep")
    )
    return n_mlp, _head_plan(config, 1.0 if heads_keep is None else heads_keep, head_units)


def _solve(gram, dense, keep, unit_size, partitions, method, options, reports, name):
    result = prune_layer(
        np.asarray(gram), np.asarray(dense), keep, unit_size, partitions, method, options
    )
    reports[name] = dict(result.stats, kept=result.kept.tolist())
    return result


def prune_params(
    config: model.LlamaConfig,
    graphdef: nnx.GraphDef,
    state: nnx.State,
    batch,
    mlp_keep: float | None = 0.5,
    heads_keep: float | None = None,
    method: str = "osscar",
    head_units: str = "query_heads",
    options: SearchOptions = SearchOptions(),
    chunk_size: int = 16,
) -> PruneResult:
    """Prunes every layer's MLP neurons to `mlp_keep` and attention heads to `heads_keep` of
    their number (None: that part is left as it is; 1.0 keeps every unit but still refits),
    calibrated on `batch` (input_ids, attention_mask and optionally positions, [B, L]; see
    `calibration_batch`). `chunk_size` tasks go through the model at a time."""
    n_mlp, (unit_size, partitions, head_keep, new_heads, new_kv) = check_arguments(
        config, mlp_keep, heads_keep, method, head_units
    )
    prune_heads, prune_mlp = heads_keep is not None, mlp_keep is not None
    ids = jnp.asarray(batch["input_ids"])
    key_mask = jnp.asarray(batch["attention_mask"]).astype(bool)
    positions = (
        jnp.asarray(batch["positions"])
        if "positions" in batch
        else model.positions_from_mask(key_mask)
    )
    causal = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))
    mask = causal[None, None] & key_mask[:, None, None, :]
    dtype = config.compute_dtype

    params = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    layers_graphdef, layers_state = nnx.split(nnx.merge(graphdef, state).layers)
    x = jnp.take(jnp.asarray(params["embed_tokens"]).astype(dtype), ids, axis=0)
    chunks = _chunks(ids.shape[0], chunk_size)
    new_layers = {
        name: []
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }
    layer_reports = []
    start = time.perf_counter()
    for layer in range(config.num_hidden_layers):
        layer_state = jax.tree.map(lambda a, layer=layer: a[layer], layers_state)
        attn = {
            name: params["layers"]["self_attn"][name][layer]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        mlp = {
            name: params["layers"]["mlp"][name][layer]
            for name in ("gate_proj", "up_proj", "down_proj")
        }
        report = {}
        timer = time.perf_counter()
        heads = [
            _attention_heads(layers_graphdef, layer_state, x[c], positions[c], mask[c])
            for c in chunks
        ]
        o_flat = attn["o_proj"].reshape(-1, config.hidden_size)
        if prune_heads:
            gram = jnp.zeros((o_flat.shape[0],) * 2, jnp.float32)
            for c, h in zip(chunks, heads, strict=True):
                gram = _gram_update(gram, h, key_mask[c])
            report["attention_calibration_seconds"] = _seconds_until_ready(timer, gram)
            result = _solve(
                gram, o_flat, head_keep, unit_size, partitions, method, options, report, "attention"
            )
            cols = _columns(result.kept, unit_size)
            heads_kept = cols.reshape(-1, config.head_dim)[:, 0] // config.head_dim
            kv_kept = (
                np.arange(config.num_key_value_heads)
                if head_units == "query_heads"
                else result.kept
            )
            o_new = result.weight.astype(np.float32)
            x = jnp.concatenate(
                [
                    _project_residual(x[c], h[..., cols], o_new)
                    for c, h in zip(chunks, heads, strict=True)
                ]
            )
            attn = dict(
                q_proj=attn["q_proj"][:, heads_kept],
                k_proj=attn["k_proj"][:, kv_kept],
                v_proj=attn["v_proj"][:, kv_kept],
                o_proj=o_new.reshape(len(heads_kept), config.head_dim, -1),
            )
        else:
            x = jnp.concatenate(
                [_project_residual(x[c], h, o_flat) for c, h in zip(chunks, heads, strict=True)]
            )
        del heads
        timer = time.perf_counter()
        if prune_mlp:
            gram = jnp.zeros((config.intermediate_size,) * 2, jnp.float32)
            for c in chunks:
                hidden = _mlp_hidden(
                    layers_graphdef, layer_state, x[c], mlp["gate_proj"], mlp["up_proj"]
                )
                gram = _gram_update(gram, hidden, key_mask[c])
            report["mlp_calibration_seconds"] = _seconds_until_ready(timer, gram)
            result = _solve(
                gram,
                mlp["down_proj"],
                [n_mlp],
                1,
                np.zeros(config.intermediate_size, np.int64),
                method,
                options,
                report,
                "mlp",
            )
            mlp = dict(
                gate_proj=mlp["gate_proj"][:, result.kept],
                up_proj=mlp["up_proj"][:, result.kept],
                down_proj=result.weight.astype(np.float32),
            )
        if layer + 1 < config.num_hidden_layers:
            x = jnp.concatenate(
                [
                    _project_residual(
                        x[c],
                        _mlp_hidden(
                            layers_graphdef, layer_state, x[c], mlp["gate_proj"], mlp["up_proj"]
                        ),
                        mlp["down_proj"],
                    )
                    for c in chunks
                ]
            )
        for name, value in {**attn, **mlp}.items():
            new_layers[name].append(value)
        layer_reports.append(report)

    new_config = dataclasses.replace(
        config,
        intermediate_size=n_mlp if prune_mlp else config.intermediate_size,
        num_attention_heads=new_heads if prune_heads else config.num_attention_heads,
        num_key_value_heads=new_kv if prune_heads else config.num_key_value_heads,
    )
    for group, names in (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
    ):
        for name in names:
            params["layers"][group][name] = np.stack(new_layers[name]).astype(np.float32)
    new_graphdef, new_state = jax.eval_shape(
        functools.partial(model.init, new_config), jax.random.key(0)
    )
    nnx.replace_by_pure_dict(new_state, jax.tree.map(jnp.asarray, params))
    report = dict(
        method=method,
        mlp_keep=mlp_keep,
        heads_keep=heads_keep,
        head_units=head_units,
        options=dataclasses.asdict(options),
        calibration_tasks=int(ids.shape[0]),
        calibration_tokens=int(key_mask.sum()),
        intermediate_size=[config.intermediate_size, new_config.intermediate_size],
        num_attention_heads=[config.num_attention_heads, new_config.num_attention_heads],
        num_key_value_heads=[config.num_key_value_heads, new_config.num_key_value_heads],
        params=[model.count_params(state), model.count_params(new_state)],
        seconds=time.perf_counter() - start,
        layers=layer_reports,
    )
    return PruneResult(new_config, new_graphdef, new_state, report)


# ---------------------------------------------------------------------------------------------
# Command line.


def prune_run(
    workdir: str,
    out: str,
    step: int | str = "latest",
    calibration_tasks: int = 128,
    calibration_seed: int = 0,
    mlp_keep: float | None = 0.5,
    heads_keep: float | None = None,
    method: str = "osscar",
    head_units: str = "query_heads",
    options: SearchOptions = SearchOptions(),
) -> dict:
    """Prunes a run's checkpoint (see `prune_params`) and writes it to `out` as an HF Llama
    directory with `prune_report.json`; returns the report."""
    if not (isinstance(calibration_tasks, int) and calibration_tasks >= 1):
        raise ConfigError(
            f"prune calibration_tasks={calibration_tasks!r} is invalid: expected a positive integer"
        )
    run = export.load_checkpoint(workdir, step)
    config = experiment.model_config(run.config, run.spec)
    check_arguments(config, mlp_keep, heads_keep, method, head_units)
    batch = calibration_batch(run.config, calibration_tasks, calibration_seed)
    result = prune_params(
        config, run.graphdef, run.params, batch, mlp_keep, heads_keep, method, head_units, options
    )
    export.write_hf_dir(out, result.state, result.config, run.spec)
    report = dict(result.report, workdir=workdir, step=run.step, calibration_seed=calibration_seed)
    with open(os.path.join(out, "prune_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The run directory whose checkpoint to prune.")
    flags.DEFINE_string("step", "latest", "The checkpoint step, `latest` or a number.")
    flags.DEFINE_string("out", None, "The HF Llama directory to write.")
    flags.DEFINE_float("mlp_keep", 0.5, "Fraction of MLP neurons kept per layer (1.0: refit only).")
    flags.DEFINE_float("heads_keep", None, "Fraction of attention heads kept (unset: untouched).")
    flags.DEFINE_enum("head_units", "query_heads", HEAD_UNITS, "What a pruned head is (GQA).")
    flags.DEFINE_enum("method", "osscar", METHODS, "The pruning method.")
    flags.DEFINE_integer("calibration_tasks", 128, "Calibration tasks (data.sample_batch).")
    flags.DEFINE_integer("calibration_seed", 0, "The calibration tasks' key.")


@cli_errors.one_line  # library logs off the terminal; a failed write ends in one line
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if not f.workdir or not f.out:
        raise SystemExit("prune needs --workdir and --out")
    export.check_export_target(f.out, overwrite=False)  # never into a run; before the work
    try:
        report = prune_run(
            f.workdir,
            f.out,
            rundir.parse_step(f.step),
            f.calibration_tasks,
            f.calibration_seed,
            mlp_keep=f.mlp_keep,
            heads_keep=f.heads_keep,
            head_units=f.head_units,
            method=f.method,
        )
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    for layer, entry in enumerate(report["layers"]):
        errors = ", ".join(
            f"{part} {entry[part]['relative_error']:.4f}"
            for part in ("attention", "mlp")
            if part in entry
        )
        print(f"layer {layer}: relative reconstruction error {errors}")
    print(
        f"pruned {f.workdir} step {report['step']} ({report['params'][0]:,} -> "
        f"{report['params'][1]:,} parameters) to {f.out} in {report['seconds']:.1f}s"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
