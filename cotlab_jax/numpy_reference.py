"""A plain NumPy implementation of the task (docs/tasks.md, sections 1-3), one example at a time,
as the PyTorch reference writes it: lists, loops, no masks, no JAX. The tests check the JAX
sampler against it, and `python -m cotlab_jax.bench sampler` times it side by side."""

import numpy as np

IGNORE = -100
RESERVED = (
    "pad",
    "bos",
    "eos",
    "input_start",
    "input_end",
    "think_start",
    "think_end",
    "answer_start",
    "answer_end",
)


def special_ids(vocab_size):
    return {name: vocab_size - 1 - i for i, name in enumerate(RESERVED)}


def activation(name, x):
    if name == "identity":
        return x
    if name == "relu":
        return np.maximum(x, 0)
    if name == "silu":
        return x / (1 + np.exp(-x))
    if name == "leaky_relu":
        return np.where(x >= 0, x, 0.5 * x)
    raise ValueError(name)


def processor(weights, act, x):
    """H_num_layers bias-free linear maps, x -> x W^T, the activation between layers."""
    for i, w in enumerate(weights):
        if i:
            x = activation(act, x)
        x = x @ w.T
    return x


def chain(embeddings, processors, adj, n, m, c, inputs, act, reserved):
    """Chain tokens of one example: a list of c ids."""
    available = list(inputs[:n])
    out = []
    for j in range(c):
        parents = adj[j][:m]
        outputs = [processor(processors[j], act, embeddings[available[p]]) for p in parents]
        logits = activation(act, np.mean(outputs, axis=0)) @ embeddings.T
        logits = logits.astype(np.float64)
        for r in reserved:
            logits[r] = -np.inf
        y = int(np.argmax(logits))
        available.append(y)
        out.append(y)
    return out


def example(strategy, inputs, chain_tokens, is_cot, ids):
    """(tokens, labels, query_part, target) of one example under a prompt strategy."""
    if strategy == "standard":
        tokens, n_unlabelled = [*inputs, chain_tokens[-1]], len(inputs)
    elif strategy == "cot":
        tokens, n_unlabelled = [*inputs, *chain_tokens], len(inputs)
    else:
        head = [ids["input_start"], *inputs, ids["input_end"]]
        think = [ids["think_start"], *chain_tokens[:-1], ids["think_end"]] if is_cot else []
        tail = [ids["answer_start"], chain_tokens[-1], ids["answer_end"], ids["eos"]]
        tokens, n_unlabelled = head + think + tail, len(head)
    labels = [IGNORE] * n_unlabelled + tokens[n_unlabelled:]
    return tokens, labels, tokens[:n_unlabelled], tokens[n_unlabelled:]


def prompt(strategy, examples, is_cot, vocab_size):
    """The training sequence, query and target of a task given its examples [(inputs, chain)]."""
    ids = special_ids(vocab_size)
    special = strategy.endswith("_special_token")
    tokens = [ids["bos"]] if special else []
    labels = list(tokens)
    query = list(tokens)
    target = []
    for i, (inputs, chain_tokens) in enumerate(examples):
        t, lab, query_part, target_part = example(strategy, inputs, chain_tokens, is_cot[i], ids)
        tokens += t
        labels += lab
        if i < len(examples) - 1:
            query += t
        else:
            query += query_part
            target = target_part
    return tokens, labels, query, target


def left_pad(seq, length, pad):
    """(padded, mask, positions) with positions counting real tokens only."""
    n_pad = length - len(seq)
    assert n_pad >= 0, (len(seq), length)
    padded = [pad] * n_pad + list(seq)
    mask = [False] * n_pad + [True] * len(seq)
    positions = [0] * n_pad + list(range(len(seq)))
    return np.array(padded), np.array(mask), np.array(positions)


def power_law(initial_prob, final_prob, alpha, scale, prompt_index, n_prompts):
    x = prompt_index / n_prompts
    return min(scale * x**alpha + initial_prob, final_prob)


def sample_task(rng, spec, embeddings):
    """One task drawn the reference's way: returns (tokens, labels, query, target), lists.

    `spec` is a `cotlab_jax.data.TaskSpec` (read for its fields only), `embeddings` float32
    [V, d]; the draws follow docs/tasks.md section 1 with NumPy's generator, so the tasks are
    distributed like the sampler's, not equal to them.
    """
    n = int(rng.choice(spec.n_input_choices))
    m = min(int(rng.choice(spec.n_parent_choices)), n)
    c = int(rng.choice(spec.chain_length_choices))
    k = int(rng.choice(spec.n_example_choices))
    special = spec.prompt_strategy.endswith("_special_token")
    usable = spec.vocab_size - (9 if special else 0)
    adj = []
    for j in range(c):
        adj.append(list(rng.choice(n + j, size=m, replace=False)))
    d = spec.n_dims
    processors = rng.normal(size=(c, spec.H_num_layers, d, d)).astype(np.float32)
    examples = []
    for _ in range(k):
        inputs = list(rng.integers(0, usable, size=n))
        examples.append(
            (
                inputs,
                chain(
                    embeddings,
                    processors,
                    adj,
                    n,
                    m,
                    c,
                    inputs,
                    spec.activation,
                    range(usable, spec.vocab_size),
                ),
            )
        )
    if spec.prompt_strategy == "hybrid_special_token":
        initial_prob, final_prob, alpha, scale = spec.recipe
        p = power_law(
            initial_prob, final_prob, alpha, scale, rng.integers(spec.n_tasks), spec.n_tasks
        )
        is_cot = list(rng.random(k) < p)
    else:
        is_cot = [spec.prompt_strategy in ("cot", "cot_special_token")] * k
    return prompt(spec.prompt_strategy, examples, is_cot, spec.vocab_size)
