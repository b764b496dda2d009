"""CoT-ICL tasks as pure, jitted functions of a key (docs/tasks.md, sections 1-3).

A task is K in-context examples sharing one random DAG over token positions and one random token
processor per chain index. Everything here has static shapes: the per-run maxima N, M, C, K of the
choices, with each task's own n, m, c, k carried as masks.

Three layers, each usable on its own:
- `make_world`: what is fixed for a run (embeddings, and the fixed DAG / processor pool ablations).
- `sample_latents` + `chain_tokens`: one task's random draws and its chain tokens.
- `layout_*`: the prompt strategies, turning a task into left-padded token sequences.
`sample_tasks` / `sample_batch` / `eval_tasks` put them together, vmapped over tasks.

Index convention (the reference's): DAG index `i < n` names input `x_i`, index `n + j` names chain
token `y_j`.
"""

import dataclasses
import json
import math
import os
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cotlab_jax import config as config_lib

IGNORE_INDEX = -100

# Reserved ids, counted down from the top of the vocabulary (docs/tasks.md, section 2).
SPECIAL_TOKEN_OFFSETS = dict(
    pad=1,
    bos=2,
    eos=3,
    input_start=4,
    input_end=5,
    think_start=6,
    think_end=7,
    answer_start=8,
    answer_end=9,
)

ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "leaky_relu": partial(jax.nn.leaky_relu, negative_slope=0.5),
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """The static description of a task distribution; hashable, so it can be a jit static arg."""

    vocab_size: int
    n_dims: int
    n_input_choices: tuple[int, ...]
    n_parent_choices: tuple[int, ...]
    chain_length_choices: tuple[int, ...]
    n_example_choices: tuple[int, ...]
    data_initializer_range: float
    activation: str
    H_num_layers: int
    ablation_fixed_dag: bool
    ablation_fixed_H: bool
    num_unique_H: int
    prompt_strategy: str
    # (initial_prob, final_prob, alpha, scale) of the power law, or None.
    recipe: tuple[float, float, float, float] | None
    recipe_order: str
    n_tasks: int

    @classmethod
    def from_config(cls, config) -> "TaskSpec":
        """Validates `config.data` (and `config.train.n_tasks`) and builds the spec."""
        data = config.data
        config_lib.validate_data(data, config.train.n_tasks)
        recipe = data.cot_example_prob_recipe_info
        if recipe is not None:
            recipe = tuple(
                float(recipe[k]) for k in ("initial_prob", "final_prob", "alpha", "scale")
            )
        return cls(
            vocab_size=data.vocab_size,
            n_dims=data.n_dims,
            n_input_choices=tuple(data.n_input_choices),
            n_parent_choices=tuple(data.n_parent_choices),
            chain_length_choices=tuple(data.chain_length_choices),
            n_example_choices=tuple(data.n_example_choices),
            data_initializer_range=float(data.data_initializer_range),
            activation=data.activation,
            H_num_layers=data.H_num_layers,
            ablation_fixed_dag=data.ablation_fixed_dag,
            ablation_fixed_H=data.ablation_fixed_H,
            num_unique_H=data.num_unique_H,
            prompt_strategy=data.prompt_strategy,
            recipe=recipe,
            recipe_order=data.cot_example_prob_recipe_order,
            n_tasks=config.train.n_tasks,
        )

    # Static maxima.
    @property
    def N(self) -> int:
        return max(self.n_input_choices)

    @property
    def M(self) -> int:
        return min(max(self.n_parent_choices), self.N)

    @property
    def C(self) -> int:
        return max(self.chain_length_choices)

    @property
    def K(self) -> int:
        return max(self.n_example_choices)

    @property
    def special_tokens(self) -> bool:
        return config_lib.uses_special_tokens(self.prompt_strategy)

    @property
    def usable_vocab_size(self) -> int:
        """Inputs and chain tokens are drawn from `[0, usable_vocab_size)`."""
        return self.vocab_size - (config_lib.NUM_RESERVED_TOKENS if self.special_tokens else 0)

    def token_id(self, name: str) -> int:
        """A reserved id by name (`pad`, `bos`, `eos`, `think_start`, ...).

        `pad` exists for every strategy: without special tokens it is only a masked filler.
        """
        if name != "pad" and not self.special_tokens:
            raise ValueError(f"prompt_strategy {self.prompt_strategy!r} has no {name!r} token")
        return self.vocab_size - SPECIAL_TOKEN_OFFSETS[name]

    @property
    def prefix_len(self) -> int:
        return 1 if self.special_tokens else 0  # <bos>

    @property
    def example_len(self) -> int:
        """The longest one example can be under this strategy."""
        return {
            "standard": self.N + 1,
            "cot": self.N + self.C,
            "standard_special_token": self.N + 6,
            "cot_special_token": self.N + self.C + 7,
            "hybrid_special_token": self.N + self.C + 7,
        }[self.prompt_strategy]

    @property
    def seq_len(self) -> int:
        """Length of the (left-padded) training sequences."""
        return self.prefix_len + self.K * self.example_len

    @property
    def query_len(self) -> int:
        """Length of the (left-padded) evaluation query prompts."""
        return self.prefix_len + (self.K - 1) * self.example_len + self.N + 2 * self.special_tokens

    @property
    def target_len(self) -> int:
        """Length of the (right-padded) evaluation targets."""
        return self.example_len - self.N - 2 * self.special_tokens

    @property
    def cot_examples(self) -> bool:
        """Whether every example shows its chain (the hybrid strategy decides per example)."""
        return self.prompt_strategy in ("cot", "cot_special_token")

    @property
    def fixed_shape(self) -> bool:
        """Every task has the same n, c, k and example forms, so the same layout."""
        return (
            len(self.n_input_choices)
            == len(self.chain_length_choices)
            == len(self.n_example_choices)
            == 1
            and self.prompt_strategy != "hybrid_special_token"
        )

    def with_changes(self, **changes) -> "TaskSpec":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# The run's fixed parts.


def root_keys(seed: int) -> dict[str, jax.Array]:
    """Keys of a run: `world` (embeddings, ablations), `train` (step s folds in s), `eval`.

    The eval set comes from `seed + 1000`, as in the reference; the world is the same for both.
    """
    world, train = jax.random.split(jax.random.key(seed))
    return dict(world=world, train=train, eval=jax.random.key(seed + 1000))


def make_world(key: jax.Array, spec: TaskSpec) -> dict[str, jax.Array]:
    """Arrays fixed for a whole run: `embeddings` [V, d], and under the ablations `fixed_adj`,
    `fixed_parent_mask` [C, M] and `processor_pool` [num_unique_H, H_num_layers, d, d]."""
    k_embed, k_dag, k_pool = jax.random.split(key, 3)
    world = dict(
        embeddings=spec.data_initializer_range
        * jax.random.normal(k_embed, (spec.vocab_size, spec.n_dims), jnp.float32)
    )
    if spec.ablation_fixed_dag:
        n, m = spec.n_input_choices[0], min(spec.n_parent_choices[0], spec.n_input_choices[0])
        noise = jax.random.uniform(k_dag, (spec.C, spec.N + spec.C))
        world["fixed_adj"], world["fixed_parent_mask"] = sample_dag(noise, n, m, spec)
    if spec.ablation_fixed_H:
        world["processor_pool"] = jax.random.normal(
            k_pool, (spec.num_unique_H, spec.H_num_layers, spec.n_dims, spec.n_dims), jnp.float32
        )
    return world


def forbidden_ids(spec: TaskSpec) -> jax.Array:
    """bool [V]: the ids a chain token may never take (the reserved ids, if any)."""
    return jnp.arange(spec.vocab_size) >= spec.usable_vocab_size


# ---------------------------------------------------------------------------------------------
# One task.


def sample_dag(noise: jax.Array, n, m, spec: TaskSpec) -> tuple[jax.Array, jax.Array]:
    """Parents of every chain token: `adj` int32 [C, M], `parent_mask` bool [C, M].

    Chain token j takes m distinct parents, uniformly without replacement and in random order,
    from indices `0 .. n + j - 1` (the inputs and earlier chain tokens). `noise` is uniform
    [C, N + C]. Masked slots hold -1.
    """
    available = jnp.arange(spec.N + spec.C)[None, :] < n + jnp.arange(spec.C)[:, None]
    # The m largest noises among the available indices are a uniform random ordered m-subset.
    _, adj = jax.lax.top_k(jnp.where(available, noise, -1.0), spec.M)
    parent_mask = jnp.broadcast_to(jnp.arange(spec.M) < m, adj.shape)
    return jnp.where(parent_mask, adj, -1).astype(jnp.int32), parent_mask


def recipe_cot_prob(spec: TaskSpec, prompt_fraction: jax.Array) -> jax.Array:
    """The power-law CoT-example probability at `prompt_fraction = i / n_prompts`.

    `p = min(scale * fraction ** alpha + initial_prob, final_prob)`; alpha = 0 gives
    `scale + initial_prob` everywhere (0 ** 0 = 1), alpha = inf gives `initial_prob` below 1.
    """
    initial_prob, final_prob, alpha, scale = spec.recipe
    return jnp.minimum(scale * jnp.power(prompt_fraction, alpha) + initial_prob, final_prob)


def _uniform(bits: jax.Array) -> jax.Array:
    """[0, 1) floats from uint32 bits (23 random mantissa bits, as jax.random.uniform)."""
    return jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0


def _below(bits: jax.Array, bound) -> jax.Array:
    """Integers uniform in [0, bound) (modulo bias below bound / 2**32)."""
    return (bits % jnp.asarray(bound, jnp.uint32)).astype(jnp.int32)


def _normal(bits: jax.Array) -> jax.Array:
    """Standard normals by the inverse CDF, as jax.random.normal."""
    lo = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
    return jnp.sqrt(2.0) * jax.lax.erf_inv(jnp.maximum(lo, 2.0 * _uniform(bits) - 1.0))


def sample_latents(
    key: jax.Array,
    prompt_index,
    n_prompts: int,
    shuffled: bool,
    world: dict[str, jax.Array],
    spec: TaskSpec,
) -> dict[str, jax.Array]:
    """One task's random draws (everything but its chain tokens).

    `prompt_index` / `n_prompts` set the recipe's CoT probability; with `shuffled` the index is
    instead drawn uniformly from `[0, n_prompts)` (the reference's shuffled epoch).
    All draws come from one block of random bits: one threefry call compiles fast.
    """
    N, C, K, d, H = spec.N, spec.C, spec.K, spec.n_dims, spec.H_num_layers
    sizes = dict(
        choices=4,
        dag=C * (N + C),
        pool=C,
        inputs=K * N,
        recipe=1,
        cot=K,
        processors=0 if spec.ablation_fixed_H else C * H * d * d,
    )
    bits = dict(
        zip(
            sizes,
            jnp.split(
                jax.random.bits(key, (sum(sizes.values()),), jnp.uint32),
                np.cumsum(list(sizes.values()))[:-1],
            ),
            strict=True,
        )
    )

    def choose(i, choices):
        return jnp.asarray(choices, jnp.int32)[_below(bits["choices"][i], len(choices))]

    n = choose(0, spec.n_input_choices)
    m = jnp.minimum(choose(1, spec.n_parent_choices), n)
    c = choose(2, spec.chain_length_choices)
    k = choose(3, spec.n_example_choices)
    if spec.ablation_fixed_dag:
        adj, parent_mask = world["fixed_adj"], world["fixed_parent_mask"]
    else:
        adj, parent_mask = sample_dag(_uniform(bits["dag"]).reshape(C, N + C), n, m, spec)
    parent_mask = parent_mask & (jnp.arange(C) < c)[:, None]
    if spec.ablation_fixed_H:
        pool = world["processor_pool"]
        processors = pool[_below(bits["pool"], pool.shape[0])]
    else:
        processors = _normal(bits["processors"]).reshape(C, H, d, d)
    inputs = _below(bits["inputs"], spec.usable_vocab_size).reshape(K, N)

    example_valid = jnp.arange(K) < k
    if spec.prompt_strategy == "hybrid_special_token":
        if shuffled:
            prompt_index = _below(bits["recipe"][0], n_prompts)
        cot_prob = recipe_cot_prob(spec, jnp.asarray(prompt_index, jnp.float32) / n_prompts)
        is_cot = _uniform(bits["cot"]) < cot_prob
    else:
        cot_prob = jnp.float32(spec.cot_examples)
        is_cot = jnp.full((K,), spec.cot_examples)
    return dict(
        n=n,
        m=m,
        c=c,
        k=k,
        adj=jnp.where(parent_mask, adj, -1),
        parent_mask=parent_mask,
        processors=processors,
        inputs=inputs,
        cot_prob=cot_prob,
        is_cot=is_cot & example_valid,
    )


def chain_tokens(
    embeddings: jax.Array,
    processors: jax.Array,
    adj: jax.Array,
    parent_mask: jax.Array,
    inputs: jax.Array,
    n_inputs,
    activation: str,
    forbidden: jax.Array,
) -> jax.Array:
    """The chain tokens of one task's K examples, int32 [K, C].

    `y_j = argmax_v < act(mean_{p in parents(j)} H_j(E[t_p])), E[v] >` over the ids not
    `forbidden` (ties go to the lowest id), where `t_p` is the token at DAG index p (an input if
    `p < n_inputs`, else chain token `p - n_inputs`) and `H_j` applies `processors[j]`'s layers
    (`x @ W.T`, `activation` between layers, not after the last).

    Args:
      embeddings: float32 [V, d], the run's data embeddings `E`.
      processors: float32 [C, H_num_layers, d, d].
      adj: int32 [C, M], parents in the index convention above.
      parent_mask: bool [C, M]; rows with no parent (chains shorter than C) give filler tokens.
      inputs: int32 [K, N]; columns `>= n_inputs` are never read.
      n_inputs: the task's n (may be traced).
      activation: one of `ACTIVATION_FNS` (static under jit).
      forbidden: bool [V].
    Works under `jit` and `vmap` over tasks (E may stay unbatched).
    """
    act = ACTIVATION_FNS[activation]
    n_examples, n_max = inputs.shape
    n_chain = processors.shape[0]
    parent_count = jnp.maximum(parent_mask.sum(-1), 1).astype(jnp.float32)

    def step(chain, j):
        idx = adj[j]
        from_inputs = jnp.take(inputs, jnp.clip(idx, 0, n_max - 1), axis=1)
        from_chain = jnp.take(chain, jnp.clip(idx - n_inputs, 0, n_chain - 1), axis=1)
        tokens = jnp.where(idx < n_inputs, from_inputs, from_chain)  # [K, M]
        layers = processors[j]

        def hidden(x):  # every layer but the last, for one parent
            for layer in range(layers.shape[0] - 1):
                x = _linear(act(x) if layer else x, layers[layer])
            return act(x) if layers.shape[0] > 1 else x

        # The last layer is linear, so the parents' mean can come before it: M times less work.
        x = sum(
            jnp.where(parent_mask[j, i], hidden(embeddings[tokens[:, i]]), 0.0)
            for i in range(tokens.shape[1])
        )
        x = x / parent_count[j]
        x = _linear(x, layers[-1])
        return chain.at[:, j].set(nearest_token(act(x), embeddings, forbidden)), None

    chain = jnp.zeros((n_examples, n_chain), jnp.int32)
    chain, _ = jax.lax.scan(step, chain, jnp.arange(n_chain))
    return chain


def _linear(x: jax.Array, weight: jax.Array) -> jax.Array:
    """`x @ weight.T` as d multiply-adds: for small processors batched over tasks, one loop
    fusion is faster on XLA:CPU than a batch of tiny dots or a multiply-and-reduce."""
    lead = (1,) * (x.ndim - 1)
    return sum(x[..., i, None] * weight[:, i].reshape(lead + (-1,)) for i in range(x.shape[-1]))


# Ties within this relative distance of the best score count as ties (see `nearest_token`).
TIE_TOLERANCE = 2.0**-20


@jax.custom_batching.custom_vmap
def nearest_token(x: jax.Array, embeddings: jax.Array, forbidden: jax.Array) -> jax.Array:
    """`argmax_v <x, E[v]>` over the ids not `forbidden`, lowest id among ties; int32 [...].

    Written as two reductions over `x @ E.T` (a max, then the lowest id within
    `TIE_TOLERANCE * |max|` of it) with only arithmetic in between, on rows flattened to 2-D
    (also under vmap, by the rule below): XLA:CPU then fuses the matmul into the reductions
    instead of materialising [rows, V] logits for an argmax, about 8x faster. Scores closer than
    the tolerance (~1e-6, a few float32 ulps) count as tied; that only matters where float
    rounding already decides the argmax.
    """
    vocab, dims = embeddings.shape
    rows = x.reshape(-1, dims)
    first_allowed = jnp.argmin(forbidden)
    # A forbidden row becomes a copy of the lowest allowed row, so it can win only by tying with
    # it, and is then mapped back to it; no masking inside the fused reductions.
    table = jnp.where(forbidden[:, None], embeddings[first_allowed], embeddings)
    best = (rows @ table.T).max(-1, keepdims=True)
    # Just below the tie band, so the best score itself clears it by at least 2**-100.
    threshold = best - TIE_TOLERANCE * jnp.abs(best) - 2.0**-100
    reversed_ids = (vocab - jnp.arange(vocab)).astype(x.dtype)[None, :]
    # A tied score gives its reversed id, any other at most 0, by one multiply and one min per
    # logit (~20% faster than clamping the margin to 0 or 1): a margin of at least 2**-100 (the
    # best score's; any positive one unless |best| < 2**-76) times 2**100 * id reaches id.
    tied_ids = jnp.minimum((rows @ table.T - threshold) * (reversed_ids * 2.0**100), reversed_ids)
    token = (vocab - tied_ids.max(-1)).astype(jnp.int32)
    token = jnp.where(forbidden[token], first_allowed, token)
    return token.astype(jnp.int32).reshape(x.shape[:-1])


@nearest_token.def_vmap
def _nearest_token_vmap(axis_size, in_batched, x, embeddings, forbidden):
    x_batched, table_batched, forbidden_batched = in_batched
    if table_batched or forbidden_batched:  # e.g. sweep members with their own embeddings
        x = x if x_batched else jnp.broadcast_to(x, (axis_size, *x.shape))
        embeddings = (
            embeddings
            if table_batched
            else jnp.broadcast_to(embeddings, (axis_size, *embeddings.shape))
        )
        forbidden = (
            forbidden
            if forbidden_batched
            else jnp.broadcast_to(forbidden, (axis_size, *forbidden.shape))
        )
        return jax.lax.map(lambda args: nearest_token(*args), (x, embeddings, forbidden)), True
    return nearest_token(x, embeddings, forbidden), x_batched


# ---------------------------------------------------------------------------------------------
# Prompt layout (docs/tasks.md, section 3).
#
# Every example is first written into S = N + C + 7 slots, the union of all strategies' forms:
#   <in_s> x_0..x_{N-1} <in_e> <think_s> y_0..y_{C-2} <think_e> <ans_s> y_last <ans_e> <eos>
# and a strategy only decides which slots are present. Present slots are then packed, in order,
# into a left-padded sequence.


def _slot_tokens(inputs, chain, c, spec: TaskSpec) -> jax.Array:
    """Slot tokens [K, S] of every example."""
    C, K = spec.C, spec.K
    tok = spec.token_id if spec.special_tokens else (lambda name: spec.token_id("pad"))
    y_last = jnp.take_along_axis(chain, jnp.broadcast_to(c - 1, (K, 1)), axis=1)

    def const(name):
        return jnp.full((K, 1), tok(name), jnp.int32)

    return jnp.concatenate(
        [
            const("input_start"),
            inputs,
            const("input_end"),
            const("think_start"),
            chain[:, : C - 1],
            const("think_end"),
            const("answer_start"),
            y_last,
            const("answer_end"),
            const("eos"),
        ],
        axis=1,
    )


def slot_presence(n, c, is_cot, spec: TaskSpec, xp=jnp):
    """Presence [K, S] of every example's slots and labelled-ness [S] (everything after <in_e>).

    They depend on n, c and `is_cot` only; with `xp=np` (all three NumPy values) they are NumPy.
    """
    N, C, K = spec.N, spec.C, spec.K
    cot = is_cot[:, None]
    markers = xp.full((K, 1), spec.special_tokens)
    present = xp.concatenate(
        [
            markers,
            xp.broadcast_to(xp.arange(N) < n, (K, N)),
            markers,
            markers & cot,
            cot & (xp.arange(C - 1) < c - 1)[None, :],
            markers & cot,
            markers,
            xp.ones((K, 1), bool),
            markers,
            markers,
        ],
        axis=1,
    )
    return present, xp.arange(N + C + 7) >= N + 2


def _pack_left(tokens, present, length: int, pad):
    """Packs the present entries of flat `tokens` into [length], left-padded; also the mask and
    positions (`model.positions_from_mask` of it, without a cumsum)."""
    if isinstance(present, np.ndarray):  # known while tracing: a static gather
        source = np.flatnonzero(present)
        offset = length - source.size
        slot = np.arange(length)
        packed = [jnp.pad(t[source], (offset, 0), constant_values=pad) for t in tokens]
        return packed, jnp.asarray(slot >= offset), jnp.asarray(np.maximum(slot - offset, 0))
    count = present.sum()
    offset = length - count
    dest = jnp.where(present, offset + jnp.cumsum(present) - 1, length)
    packed = [jnp.full((length,), pad, t.dtype).at[dest].set(t, mode="drop") for t in tokens]
    slot = jnp.arange(length)
    return packed, slot >= offset, jnp.maximum(slot - offset, 0)


def layout_task(inputs, chain, n, c, k, is_cot, spec: TaskSpec) -> dict[str, jax.Array]:
    """One task's training sequence, evaluation query and targets (docs/tasks.md, sections 3 and 4).

    `is_cot` [K] decides each example's form: for the query it may differ from training (for
    instance, False on a demonstration drops its think span). Where n, c, k are ints and `is_cot`
    a NumPy array (`sample_task` under `spec.fixed_shape`), which slots are present is known while
    tracing and the packing is a static gather, without the cumsums and scatters.
    """
    xp = jnp if any(isinstance(v, jax.Array) for v in (n, c, k, is_cot)) else np
    pad = spec.token_id("pad")
    tokens = _slot_tokens(inputs, chain, c, spec)
    present, labelled = slot_presence(n, c, is_cot, spec, xp)
    example_valid = (xp.arange(spec.K) < k)[:, None]
    labels = jnp.where(labelled, tokens, IGNORE_INDEX)
    if spec.special_tokens:  # the <bos> prefix, labelled
        bos = jnp.full((1,), spec.token_id("bos"), jnp.int32)
        prefix_tokens, prefix_present = bos, xp.ones((1,), bool)
    else:
        prefix_tokens, prefix_present = jnp.zeros((0,), jnp.int32), xp.zeros((0,), bool)

    def flat(prefix, body, xp=jnp):
        return xp.concatenate([prefix, body.reshape(-1)])

    train_present = flat(prefix_present, present & example_valid, xp)
    (input_ids, label_ids), attention_mask, positions = _pack_left(
        (flat(prefix_tokens, tokens), flat(prefix_tokens, labels)), train_present, spec.seq_len, pad
    )
    label_ids = jnp.where(attention_mask, label_ids, IGNORE_INDEX)

    # The query: the first k-1 examples in full, then the last one cut after its inputs.
    example = xp.arange(spec.K)[:, None]
    query_cut = (example < k - 1) | ((example == k - 1) & ~labelled[None, :])
    (query_ids,), query_mask, query_positions = _pack_left(
        (flat(prefix_tokens, tokens),),
        flat(prefix_present, present & query_cut, xp),
        spec.query_len,
        pad,
    )
    # Targets: the last example's labelled tokens, left-aligned.
    last_tokens = jnp.take(tokens, k - 1, axis=0)
    target_present = xp.take(present, k - 1, axis=0) & labelled
    order = xp.argsort(~target_present, stable=True)[: spec.target_len]
    target_ids = jnp.where(target_present[order], last_tokens[order], IGNORE_INDEX)
    return dict(
        input_ids=input_ids,
        labels=label_ids,
        attention_mask=attention_mask,
        positions=positions,
        query_ids=query_ids,
        query_mask=query_mask,
        query_positions=query_positions,
        target_ids=target_ids,
    )


# ---------------------------------------------------------------------------------------------
# Tasks in bulk.


def sample_task(key, prompt_index, n_prompts: int, shuffled: bool, world, spec: TaskSpec):
    """One complete task: latents, chain tokens and layouts (see `sample_tasks` for fields)."""
    lat = sample_latents(key, prompt_index, n_prompts, shuffled, world, spec)
    chain = chain_tokens(
        world["embeddings"],
        lat["processors"],
        lat["adj"],
        lat["parent_mask"],
        lat["inputs"],
        lat["n"],
        spec.activation,
        forbidden_ids(spec),
    )
    if spec.fixed_shape:  # the same n, c, k and example forms in every task
        n, c, k, is_cot = spec.N, spec.C, spec.K, np.full(spec.K, spec.cot_examples)
    else:
        n, c, k, is_cot = lat["n"], lat["c"], lat["k"], lat["is_cot"]
    task = layout_task(lat["inputs"], chain, n, c, k, is_cot, spec)
    example_valid = jnp.arange(spec.K) < lat["k"]
    n_cot = (lat["is_cot"] & example_valid).sum().astype(jnp.int32)
    task.update(
        inputs=jnp.where(
            (jnp.arange(spec.N) < lat["n"])[None, :] & example_valid[:, None], lat["inputs"], -1
        ),
        chain=jnp.where(
            (jnp.arange(spec.C) < lat["c"])[None, :] & example_valid[:, None], chain, -1
        ),
        adj=lat["adj"],
        parent_mask=lat["parent_mask"],
        n=lat["n"],
        m=lat["m"],
        c=lat["c"],
        k=lat["k"],
        is_cot=lat["is_cot"],
        n_cot=n_cot,
        n_direct=lat["k"] - n_cot,
        cot_prob=lat["cot_prob"],
    )
    return task


def sample_tasks(
    keys, prompt_indices, n_prompts: int, shuffled: bool, world, spec: TaskSpec
) -> dict[str, jax.Array]:
    """Tasks from per-task keys [B]; every field has a leading batch axis B.

    Fields (L = spec.seq_len, Lq = spec.query_len, T = spec.target_len):
      input_ids int32 [B, L]       training tokens, left-padded with the pad id.
      labels int32 [B, L]          aligned with input_ids; -100 where no loss is taken.
      attention_mask bool [B, L]   False on padding.
      positions int32 [B, L]       position ids counting real tokens only.
      query_ids, query_mask, query_positions [B, Lq]
                                   the evaluation prompt: k-1 examples, then the last one's
                                   inputs (`x..` or `<in_s> x.. <in_e>`), left-padded.
      target_ids int32 [B, T]      the last example's labelled tokens, then -100.
      inputs int32 [B, K, N]       input tokens; -1 beyond n or k.
      chain int32 [B, K, C]        chain tokens; -1 beyond c or k. chain[:, k-1, c-1] is the answer.
      adj int32 [B, C, M]          DAG parents (index < n: input, n + j: chain token j); -1 masked.
      parent_mask bool [B, C, M]
      n, m, c, k int32 [B]         the task's inputs, parents, chain length and example count.
      is_cot bool [B, K]           whether each example is in CoT form (False beyond k).
      n_cot, n_direct int32 [B]    counts of CoT and direct-answer examples.
      cot_prob float32 [B]         the CoT probability the task was drawn with.
    """
    return jax.vmap(sample_task, (0, 0, None, None, None, None))(
        keys, prompt_indices, n_prompts, shuffled, world, spec
    )


def task_keys(key: jax.Array, task_ids: jax.Array) -> jax.Array:
    """Per-task keys: task i's key depends only on (key, i), never on batch size or chunking."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, task_ids)


@partial(jax.jit, static_argnames=("spec", "batch_size"))
def sample_batch(world, train_key, step, spec: TaskSpec, batch_size: int):
    """The training batch of `step`: tasks `step * batch_size + b` for b < batch_size, keyed by
    `fold_in(train_key, step)`. Identical on any device count. Fields: see `sample_tasks`."""
    ids = jnp.arange(batch_size, dtype=jnp.int32)
    keys = task_keys(jax.random.fold_in(train_key, step), ids)
    return sample_tasks(
        keys, step * batch_size + ids, spec.n_tasks, spec.recipe_order == "shuffled", world, spec
    )


@partial(jax.jit, static_argnames=("spec", "n_eval_tasks"))
def eval_tasks(world, eval_key, task_ids, spec: TaskSpec, n_eval_tasks: int):
    """Evaluation tasks `task_ids` of an eval set of `n_eval_tasks` (the recipe's index is the task
    id, in order, as in the reference's eval set)."""
    return sample_tasks(task_keys(eval_key, task_ids), task_ids, n_eval_tasks, False, world, spec)


def build_eval_set(
    world, eval_key, spec: TaskSpec, n_eval_tasks: int, chunk_size: int = 1024
) -> dict[str, np.ndarray]:
    """The frozen eval set, made on device in chunks; the result never depends on chunk_size."""
    chunks = []
    for start in range(0, n_eval_tasks, chunk_size):
        ids = np.arange(start, start + chunk_size, dtype=np.int32)
        # The last chunk is padded to a full one so there is a single compilation.
        tasks = eval_tasks(world, eval_key, jnp.asarray(ids), spec, n_eval_tasks)
        size = min(chunk_size, n_eval_tasks - start)
        chunks.append(jax.tree.map(lambda x, size=size: np.asarray(x)[:size], tasks))
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def save_eval_set(path: str, eval_set: dict[str, np.ndarray], spec: TaskSpec) -> None:
    """Writes the eval set as a plain .npz (no pickle), with the spec it was made from.

    Written to a temporary name and renamed, so a crash never leaves a half-written set.
    """
    spec_id = np.asarray(_eval_set_id(spec))
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, __spec__=spec_id, **eval_set)
    os.replace(tmp, path)


def load_eval_set(path: str, spec: TaskSpec | None = None) -> dict[str, np.ndarray]:
    """Reads an eval set written by `save_eval_set`; refuses one made from another spec."""
    with np.load(path, allow_pickle=False) as f:
        data = {name: f[name] for name in f.files}
    saved = str(data.pop("__spec__"))
    if spec is not None and saved != _eval_set_id(spec):
        raise ValueError(f"eval set {path} was made from another task spec: {saved}")
    return data


def spec_json(spec: TaskSpec, exclude: tuple[str, ...] = ()) -> str:
    """The spec as canonical JSON (infinite recipe values as strings), less `exclude`."""
    fields = dataclasses.asdict(spec)
    fields["recipe"] = (
        None if spec.recipe is None else [v if math.isfinite(v) else str(v) for v in spec.recipe]
    )
    return json.dumps({k: v for k, v in fields.items() if k not in exclude}, sort_keys=True)


# Fields that shape training only: an eval set made under other values is the same set.
TRAIN_ONLY_FIELDS = ("n_tasks", "recipe_order")


def _eval_set_id(spec: TaskSpec) -> str:
    return spec_json(spec, exclude=TRAIN_ONLY_FIELDS)
