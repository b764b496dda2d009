r"""Symbolic string tasks (DESIGN 1.7): the CoT-ICL DAG machinery over words, as chats.

Text for fine-tuning or prompting pretrained LLMs, so drawn on the host with NumPy: task i is a
function of `(seed, i)` only (`np.random.default_rng([seed, i])`).

A task draws `n, m, c, k` uniformly from their choices (`m = min(m, n)`) and one DAG shared by its
k examples: chain index j takes m distinct parents, uniformly without replacement and in random
order, from indices `0 .. n + j - 1` (index `i < n` is input word i, index `n + j'` chain word j').
Each example has n random lowercase input words of `word_length` letters, and chain words

    y_j = shift(concat(word[len(word) // 2:] for the parents of j in ascending index order),
                char_offset)

where `shift` moves every letter `char_offset` places forward in the alphabet, wrapping from `z`
to `a`. The last chain word `y_{c-1}` is the answer. Each example is in CoT form with the power-law
probability `p = min(scale * (i / n_tasks) ** alpha + initial_prob, final_prob)` (DESIGN 1.3;
`recipe_order="shuffled"` draws the index i uniformly, `"curriculum"` uses the task's own index;
the defaults, alpha = 0, make every example CoT).

A chat is a list of `{"role", "content"}` messages: `SYSTEM_PROMPT`, then for each of the k
examples a user turn and an assistant turn. The last assistant turn is the target.

    user:       Input: <x_0> <x_1> ... <x_{n-1}>
    assistant:  Step 1: <y_0>                       (CoT form: one line per chain word
                Step 2: <y_1>                        before the last, then the answer;
                \boxed{<y_{c-1}>}                    lines joined by "\n")
    assistant:  \boxed{<y_{c-1}>}                   (direct form)

Command line, one chat (a JSON list of messages) per line:

    python -m cotlab_jax.symbolic --n_tasks=1000 --out=tasks.jsonl [--seed=0] [--n_inputs=4 ...]
"""

import dataclasses
import json
import math
import os
import string
from collections.abc import Iterator

import numpy as np
from absl import app, flags

from cotlab_jax.numpy_reference import power_law

SYSTEM_PROMPT = (
    "Each question gives a list of input words. A hidden rule, the same for every question in "
    "this conversation, builds a chain of words from them: each chain word joins the second "
    "halves of some earlier words (inputs or earlier chain words, in their order), then shifts "
    "every letter forward in the alphabet by a fixed amount, wrapping from z to a. The last "
    "chain word is the answer. Answer either with the chain words before the last as lines "
    "'Step 1: <word>', 'Step 2: <word>', ... followed by the answer as \\boxed{<word>}, or with "
    "only the answer as \\boxed{<word>}."
)
RECIPE_ORDERS = ("shuffled", "curriculum")


@dataclasses.dataclass(frozen=True)
class SymbolicConfig:
    """The task distribution; defaults are DESIGN 1.7's (N=4, M=2, C=3, K=40, all CoT)."""

    n_input_choices: tuple[int, ...] = (4,)
    n_parent_choices: tuple[int, ...] = (2,)
    chain_length_choices: tuple[int, ...] = (3,)
    n_example_choices: tuple[int, ...] = (40,)
    word_length: int = 8
    char_offset: int = 1
    initial_prob: float = 0.0
    final_prob: float = 1.0
    alpha: float = 0.0
    scale: float = 1.0
    recipe_order: str = "shuffled"

    def __post_init__(self):
        for name in ("n_input_choices", "n_parent_choices", "chain_length_choices",
                     "n_example_choices"):
            value = getattr(self, name)
            if not (len(value) and all(isinstance(v, int) and v >= 1 for v in value)):
                _fail(name, value, "a non-empty tuple of positive integers")
        if not (isinstance(self.word_length, int) and self.word_length >= 2):
            _fail("word_length", self.word_length, "an integer >= 2 (words are halved)")
        if not isinstance(self.char_offset, int):
            _fail("char_offset", self.char_offset, "an integer")
        for name in ("initial_prob", "final_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(name, getattr(self, name), "a probability in [0, 1]")
        if not self.alpha >= 0:
            _fail("alpha", self.alpha, "a number >= 0 (inf allowed)")
        if not (math.isfinite(self.scale) and self.scale >= 0):
            _fail("scale", self.scale, "a finite number >= 0")
        if self.recipe_order not in RECIPE_ORDERS:
            _fail("recipe_order", self.recipe_order, f"one of {RECIPE_ORDERS}")


def _fail(field: str, value, allowed: str):
    raise ValueError(f"symbolic.{field}={value!r}: expected {allowed}")


@dataclasses.dataclass(frozen=True)
class SymbolicTask:
    """One task. `adj[j]` lists chain word j's parents in draw order; `inputs[e]` and `chain[e]`
    are example e's words; the answer is `chain[k - 1][c - 1]`."""

    n: int
    m: int
    c: int
    k: int
    adj: tuple[tuple[int, ...], ...]
    inputs: tuple[tuple[str, ...], ...]
    chain: tuple[tuple[str, ...], ...]
    is_cot: tuple[bool, ...]
    cot_prob: float


def shift_word(word: str, offset: int) -> str:
    """Every lowercase letter moved `offset` places forward in the alphabet, wrapping."""
    letters = string.ascii_lowercase
    return word.translate(str.maketrans(letters, letters[offset % 26:] + letters[:offset % 26]))


def chain_word(parent_words: list[str], char_offset: int) -> str:
    """The second halves of `parent_words` (already in ascending index order), joined and
    shifted."""
    return shift_word("".join(w[len(w) // 2:] for w in parent_words), char_offset)


def sample_dag(rng: np.random.Generator, n: int, m: int, c: int) -> tuple[tuple[int, ...], ...]:
    """Parents of each chain index j: m distinct indices from `0 .. n + j - 1`, random order."""
    return tuple(tuple(int(p) for p in rng.choice(n + j, size=m, replace=False))
                 for j in range(c))


def example_chain(inputs: tuple[str, ...], adj, char_offset: int) -> tuple[str, ...]:
    """The chain words of one example, in order (each may read earlier ones)."""
    words = list(inputs)
    for parents in adj:
        words.append(chain_word([words[p] for p in sorted(parents)], char_offset))
    return tuple(words[len(inputs):])


def sample_task(seed: int, index: int, n_tasks: int, config: SymbolicConfig) -> SymbolicTask:
    """Task `index` of `n_tasks` (the recipe's denominator), a function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    n = int(rng.choice(config.n_input_choices))
    m = min(int(rng.choice(config.n_parent_choices)), n)
    c = int(rng.choice(config.chain_length_choices))
    k = int(rng.choice(config.n_example_choices))
    adj = sample_dag(rng, n, m, c)
    letters = rng.integers(0, 26, size=(k, n, config.word_length))
    inputs = tuple(tuple("".join(string.ascii_lowercase[i] for i in word) for word in example)
                   for example in letters)
    chain = tuple(example_chain(words, adj, config.char_offset) for words in inputs)
    prompt_index = rng.integers(n_tasks) if config.recipe_order == "shuffled" else index
    cot_prob = power_law(config.initial_prob, config.final_prob, config.alpha, config.scale,
                         prompt_index, n_tasks)
    is_cot = tuple(bool(u < cot_prob) for u in rng.random(k))
    return SymbolicTask(n=n, m=m, c=c, k=k, adj=adj, inputs=inputs, chain=chain, is_cot=is_cot,
                        cot_prob=float(cot_prob))


def format_question(inputs: tuple[str, ...]) -> str:
    return "Input: " + " ".join(inputs)


def format_answer(chain: tuple[str, ...], is_cot: bool) -> str:
    steps = [f"Step {i + 1}: {word}" for i, word in enumerate(chain[:-1])] if is_cot else []
    return "\n".join([*steps, f"\\boxed{{{chain[-1]}}}"])


def render_chat(task: SymbolicTask) -> list[dict[str, str]]:
    """The task as a chat: the system prompt, then a question/answer turn pair per example."""
    chat = [dict(role="system", content=SYSTEM_PROMPT)]
    for inputs, chain, is_cot in zip(task.inputs, task.chain, task.is_cot, strict=True):
        chat.append(dict(role="user", content=format_question(inputs)))
        chat.append(dict(role="assistant", content=format_answer(chain, is_cot)))
    return chat


def generate(n_tasks: int, seed: int, config: SymbolicConfig) -> Iterator[SymbolicTask]:
    if not (isinstance(n_tasks, int) and n_tasks >= 1):
        _fail("n_tasks", n_tasks, "a positive integer")
    return (sample_task(seed, index, n_tasks, config) for index in range(n_tasks))


def write_jsonl(path: str, n_tasks: int, seed: int, config: SymbolicConfig) -> None:
    """One chat per line; written to a temporary name and renamed, never left half-written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for task in generate(n_tasks, seed, config):
            f.write(json.dumps(render_chat(task)) + "\n")
    os.replace(tmp, path)


def define_task_flags() -> None:
    """The flags of a `SymbolicConfig` (also used by `python -m cotlab_jax.tfds_builder`)."""
    defaults = SymbolicConfig()
    flags.DEFINE_list("n_inputs", list(map(str, defaults.n_input_choices)), "Choices of n.")
    flags.DEFINE_list("n_parents", list(map(str, defaults.n_parent_choices)), "Choices of m.")
    flags.DEFINE_list("chain_length", list(map(str, defaults.chain_length_choices)),
                      "Choices of c.")
    flags.DEFINE_list("n_examples", list(map(str, defaults.n_example_choices)), "Choices of k.")
    flags.DEFINE_integer("word_length", defaults.word_length, "Letters per input word.")
    flags.DEFINE_integer("char_offset", defaults.char_offset, "Alphabet shift of chain words.")
    for name in ("initial_prob", "final_prob", "alpha", "scale"):
        flags.DEFINE_float(name, getattr(defaults, name), f"Power-law CoT recipe: {name}.")
    flags.DEFINE_enum("recipe_order", defaults.recipe_order, list(RECIPE_ORDERS),
                      "The recipe's prompt index: a uniform draw, or the task's index.")


def config_from_flags(f) -> SymbolicConfig:
    """The `SymbolicConfig` of the task flags; a bad value exits with a one-line message."""
    try:
        return SymbolicConfig(
            n_input_choices=_int_choices("n_inputs", f.n_inputs),
            n_parent_choices=_int_choices("n_parents", f.n_parents),
            chain_length_choices=_int_choices("chain_length", f.chain_length),
            n_example_choices=_int_choices("n_examples", f.n_examples),
            word_length=f.word_length, char_offset=f.char_offset, initial_prob=f.initial_prob,
            final_prob=f.final_prob, alpha=f.alpha, scale=f.scale, recipe_order=f.recipe_order)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def define_flags() -> None:
    flags.DEFINE_integer("n_tasks", None, "How many chats to write.")
    flags.DEFINE_string("out", None, "The .jsonl file to write.")
    flags.DEFINE_integer("seed", 0, "Task i is a function of (seed, i).")
    define_task_flags()


def _int_choices(name: str, values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        joined = ",".join(values)
        raise SystemExit(f"--{name}={joined}: expected comma-separated integers") from None


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if f.n_tasks is None or not f.out:
        raise SystemExit("--n_tasks and --out are required")
    config = config_from_flags(f)
    try:
        write_jsonl(f.out, f.n_tasks, f.seed, config)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(f"wrote {f.n_tasks} chats to {f.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
