r"""Symbolic string tasks: the CoT-ICL DAG machinery over words, rendered as the reference's chats.

The reference (CoT-ICL Lab, `core/data/symbolic/`) prepares raw tasks and renders them as chats for
fine-tuning or prompting pretrained LLMs; this module writes the same fields and the same chat text,
so data and scores carry over. docs/symbolic.md has the format in full and every difference from
the reference.

Raw tasks. Task `t` of a seed is a function of `(seed, t)` only (`np.random.default_rng([seed,
t])`); the train split is tasks `0 .. n_train - 1`, the test split the next `n_test` tasks of the
same stream (defaults: seed 42, 1,000 train and 10,000 test tasks, as the reference). A task draws
`n, m, c, k` from their choices and one DAG shared by its k examples: chain index j takes m distinct
parents from indices `0 .. n + j - 1` (index `i < n` is input word i, `n + j'` chain word j'),
stored sorted. Each example has n random lowercase words of `word_length` letters and chain words

    y_j = shift(concat(word[len(word) // 2:] for the parents of j, ascending), char_offset)

(`shift` moves each letter forward in the alphabet, wrapping from z to a). An example is stored as
the reference stores it: `input_words`, `intermediate_words` (y_0 .. y_{c-2}), `answer_word`
(y_{c-1}) and the sorted `adj_list`. Defaults: n=4, m=2, c=3, k=40 stored examples.

Rendered rows. A chat shows the first `examples_per_prompt` stored examples (default: all), so one
raw task renders at any K. Messages: `SYSTEM_PROMPT`, then per example a user turn

    Given the input words: a, b, c, d, what is the final answer after the string transformations?

and an assistant turn, in CoT form with probability `cot_example_prob`, else direct:

    <|im_start|>think\nStep 1: y_0\n...Step c-1: y_{c-2}\n<|im_start|>final answer\n\boxed{y_{c-1}}
    <|im_start|>final answer\n\boxed{y_{c-1}}

`text` is the chat in ChatML (`<|im_start|>role\ncontent<|im_end|>\n` per message, what the
reference's Qwen2.5-Instruct template gives), or a local `transformers` tokenizer's own chat
template (`--tokenizer=PATH`). `cot_example_prob = min(scale * (i / n_rows) ** alpha +
initial_prob, final_prob)`, the reference's power-law recipe; `recipe_order="shuffled"` (the
reference's scheme) uses the row index i, so each p(i) occurs once, then shuffles the rows.

Beyond the reference: choices of n, m, c and k instead of one value each; the recipe orders
`"random"` (each row draws its index i uniformly, rows in task order) and `"curriculum"` (index i,
rows in task order); the test split rendered too; the TFDS output (`cotlab_jax.tfds_builder
--symbolic`); `is_cot` recorded per rendered example; `m > n` refused up front.

Command line (writes OUT_DIR/train.jsonl and OUT_DIR/test.jsonl, one rendered row per line):

    python -m cotlab_jax.symbolic --out_dir=OUT_DIR [--n_train_tasks=1000 --n_test_tasks=10000
        --seed=42 --examples_per_prompt=K --tokenizer=PATH --n_inputs=4 --n_parents=2 ...]
"""

import dataclasses
import json
import math
import os
import string
from collections.abc import Callable, Sequence

import numpy as np
from absl import app, flags

from cotlab_jax import cli_errors
from cotlab_jax.numpy_reference import power_law

THINK_PREFIX = "<|im_start|>think\n"
ANSWER_PREFIX = "<|im_start|>final answer\n"
# The reference's wording, character for character: its instructions end "with: <think prefix>."
# (the prefix's newline before the full stop) and write the box with two backslashes.
SYSTEM_PROMPT = (
    "You are a helpful problem solver who follows instructions.\n\n"
    "Given some examples of string transformations, you must figure out the underlying "
    "transformation rule\nand apply it to the set of words in the last example.\n\n"
    "Instructions for the response:\n"
    f"a. If you choose to think out loud, you must start your response with: {THINK_PREFIX}.\n"
    f"b. The final answer must always be provided in the: {ANSWER_PREFIX}\\\\boxed{{}} format.\n"
    "c. You should not think or explain after providing the final answer.\n"
)
RECIPE_ORDERS = ("shuffled", "random", "curriculum")
DEFAULT_SEED = 42
DEFAULT_N_TRAIN = 1_000
DEFAULT_N_TEST = 10_000
# Draws for rendering (CoT flags, the random recipe index) and the row shuffle come from streams
# apart from the tasks', so the raw tasks do not depend on how they are rendered.
_RENDER_STREAM = 1
_SHUFFLE_STREAM = 2

Messages = list[dict[str, str]]


def _fail(field: str, value, allowed: str):
    raise ValueError(f"symbolic.{field}={value!r}: expected {allowed}")


@dataclasses.dataclass(frozen=True)
class SymbolicConfig:
    """The raw task distribution; the defaults are the reference's (N=4, M=2, C=3, K=40)."""

    n_input_choices: tuple[int, ...] = (4,)
    n_parent_choices: tuple[int, ...] = (2,)
    chain_length_choices: tuple[int, ...] = (3,)
    n_example_choices: tuple[int, ...] = (40,)
    word_length: int = 8
    char_offset: int = 1

    def __post_init__(self):
        for name in (
            "n_input_choices",
            "n_parent_choices",
            "chain_length_choices",
            "n_example_choices",
        ):
            value = getattr(self, name)
            if not (len(value) and all(isinstance(v, int) and v >= 1 for v in value)):
                _fail(name, value, "a non-empty tuple of positive integers")
        if max(self.n_parent_choices) > min(self.n_input_choices):
            _fail(
                "n_parent_choices",
                self.n_parent_choices,
                f"parents per chain word m <= input words n for every draw (the smallest n "
                f"choice is {min(self.n_input_choices)})",
            )
        if not (isinstance(self.word_length, int) and self.word_length >= 2):
            _fail("word_length", self.word_length, "an integer >= 2 (words are halved)")
        if not isinstance(self.char_offset, int):
            _fail("char_offset", self.char_offset, "an integer")


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """How raw tasks become chats: examples per chat (None: all stored) and the CoT recipe. The
    defaults (alpha = 0, so p = min(scale + initial_prob, final_prob) = 1) make every example
    CoT."""

    examples_per_prompt: int | None = None
    initial_prob: float = 0.0
    final_prob: float = 1.0
    alpha: float = 0.0
    scale: float = 1.0
    recipe_order: str = "shuffled"

    def __post_init__(self):
        k = self.examples_per_prompt
        if not (k is None or (isinstance(k, int) and k >= 1)):
            _fail("examples_per_prompt", k, "a positive integer, or None for all stored examples")
        for name in ("initial_prob", "final_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(name, getattr(self, name), "a probability in [0, 1]")
        if not self.alpha >= 0:
            _fail("alpha", self.alpha, "a number >= 0 (inf allowed)")
        if not (math.isfinite(self.scale) and self.scale >= 0):
            _fail("scale", self.scale, "a finite number >= 0")
        if self.recipe_order not in RECIPE_ORDERS:
            _fail("recipe_order", self.recipe_order, f"one of {RECIPE_ORDERS}")

    def check_against(self, config: SymbolicConfig) -> None:
        """Refuses a chat longer than any stored task."""
        stored = max(config.n_example_choices)
        if self.examples_per_prompt is not None and self.examples_per_prompt > stored:
            _fail(
                "examples_per_prompt",
                self.examples_per_prompt,
                f"at most the examples stored per task ({stored})",
            )


@dataclasses.dataclass(frozen=True)
class SymbolicExample:
    """One example, with the reference's raw fields."""

    input_words: tuple[str, ...]
    intermediate_words: tuple[str, ...]
    answer_word: str
    adj_list: tuple[tuple[int, ...], ...]

    def to_json(self) -> dict:
        return dict(
            input_words=list(self.input_words),
            intermediate_words=list(self.intermediate_words),
            answer_word=self.answer_word,
            adj_list=[list(p) for p in self.adj_list],
        )


@dataclasses.dataclass(frozen=True)
class SymbolicTask:
    """A raw task: `task_id` in its seed's stream and its k examples (all share `adj_list`)."""

    task_id: int
    examples: tuple[SymbolicExample, ...]

    @property
    def n(self) -> int:
        return len(self.examples[0].input_words)

    @property
    def m(self) -> int:
        return len(self.examples[0].adj_list[0])

    @property
    def c(self) -> int:
        return len(self.examples[0].adj_list)

    @property
    def k(self) -> int:
        return len(self.examples)

    @classmethod
    def from_json(cls, row: dict) -> "SymbolicTask":
        """The task of a written row (its `task_id` and `examples`)."""
        examples = tuple(
            SymbolicExample(
                input_words=tuple(e["input_words"]),
                intermediate_words=tuple(e["intermediate_words"]),
                answer_word=e["answer_word"],
                adj_list=tuple(tuple(p) for p in e["adj_list"]),
            )
            for e in row["examples"]
        )
        return cls(task_id=row["task_id"], examples=examples)


@dataclasses.dataclass(frozen=True)
class RenderedRow:
    """A task as one chat: its first `len(is_cot)` examples, `is_cot[e]` the form of example e."""

    task: SymbolicTask
    messages: Messages
    text: str
    cot_example_prob: float
    is_cot: tuple[bool, ...]

    def to_json(self) -> dict:
        return dict(
            task_id=self.task.task_id,
            examples=[e.to_json() for e in self.task.examples],
            messages=self.messages,
            text=self.text,
            cot_example_prob=self.cot_example_prob,
            is_cot=list(self.is_cot),
        )


def shift_word(word: str, offset: int) -> str:
    """Every lowercase letter moved `offset` places forward in the alphabet, wrapping."""
    letters = string.ascii_lowercase
    return word.translate(str.maketrans(letters, letters[offset % 26 :] + letters[: offset % 26]))


def chain_word(parent_words: Sequence[str], char_offset: int) -> str:
    """The second halves of `parent_words` (in ascending index order), joined and shifted."""
    return shift_word("".join(w[len(w) // 2 :] for w in parent_words), char_offset)


def sample_dag(rng: np.random.Generator, n: int, m: int, c: int) -> tuple[tuple[int, ...], ...]:
    """Parents of each chain index j: m distinct indices of `0 .. n + j - 1`, sorted."""
    return tuple(
        tuple(sorted(int(p) for p in rng.choice(n + j, size=m, replace=False))) for j in range(c)
    )


def make_example(input_words: tuple[str, ...], adj_list, char_offset: int) -> SymbolicExample:
    """An example's chain words, in order (each may read earlier ones)."""
    words = list(input_words)
    for parents in adj_list:
        words.append(chain_word([words[p] for p in parents], char_offset))
    chain = words[len(input_words) :]
    return SymbolicExample(
        input_words=input_words,
        intermediate_words=tuple(chain[:-1]),
        answer_word=chain[-1],
        adj_list=adj_list,
    )


def sample_task(seed: int, task_id: int, config: SymbolicConfig) -> SymbolicTask:
    """Task `task_id` of the seed's stream, a function of (seed, task_id) only."""
    rng = np.random.default_rng([seed, task_id])
    n = int(rng.choice(config.n_input_choices))
    m = int(rng.choice(config.n_parent_choices))
    c = int(rng.choice(config.chain_length_choices))
    k = int(rng.choice(config.n_example_choices))
    adj_list = sample_dag(rng, n, m, c)
    letters = rng.integers(0, 26, size=(k, n, config.word_length))
    # Letter codes as one fixed-width byte string per word.
    words = (letters + ord("a")).astype(np.uint8).view(f"S{config.word_length}")[..., 0]
    examples = tuple(
        make_example(tuple(w.decode() for w in example), adj_list, config.char_offset)
        for example in words
    )
    return SymbolicTask(task_id=task_id, examples=examples)


def split_task_ids(n_train: int, n_test: int) -> dict[str, range]:
    """One stream: the train split's tasks, then the test split's."""
    for name, value in (("n_train_tasks", n_train), ("n_test_tasks", n_test)):
        if not (isinstance(value, int) and value >= 1):
            _fail(name, value, "a positive integer")
    return {"train": range(n_train), "test": range(n_train, n_train + n_test)}


def generate(seed: int, task_ids: range, config: SymbolicConfig) -> list[SymbolicTask]:
    return [sample_task(seed, t, config) for t in task_ids]


def format_question(input_words: Sequence[str]) -> str:
    return (
        "Given the input words: "
        + ", ".join(input_words)
        + ", what is the final answer after the string transformations?"
    )


def format_answer(example: SymbolicExample, is_cot: bool) -> str:
    """The think block (CoT form) and the final-answer block."""
    think = "".join(f"Step {i + 1}: {word}\n" for i, word in enumerate(example.intermediate_words))
    final = ANSWER_PREFIX + f"\\boxed{{{example.answer_word}}}"
    return THINK_PREFIX + think + final if is_cot else final


def chat_messages(task: SymbolicTask, is_cot: Sequence[bool]) -> Messages:
    """The system prompt, then a user/assistant turn pair for each of the first len(is_cot)
    examples."""
    messages = [dict(role="system", content=SYSTEM_PROMPT)]
    for example, cot in zip(task.examples, is_cot, strict=False):
        messages.append(dict(role="user", content=format_question(example.input_words)))
        messages.append(dict(role="assistant", content=format_answer(example, cot)))
    return messages


def chatml_text(messages: Messages) -> str:
    """The chat in ChatML, as Qwen2.5-Instruct's template writes a chat that opens with a system
    message (no generation prompt)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def tokenizer_chat_text(path: str) -> Callable[[Messages], str]:
    """Renders with the chat template of the `transformers` tokenizer saved at `path` (local
    files only)."""
    if not os.path.isdir(path):
        _fail("tokenizer", path, "a directory holding a saved transformers tokenizer")
    try:
        # Optional, and seconds to import: loaded only when a tokenizer is asked for.
        import transformers
    except ModuleNotFoundError:
        _fail("tokenizer", path, "transformers installed (pip install transformers)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        _fail(
            "tokenizer",
            path,
            f"a loadable tokenizer ({type(error).__name__}: {str(error).splitlines()[0]})",
        )
    if not tokenizer.chat_template:
        _fail("tokenizer", path, "a tokenizer with a chat_template")
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)


def render_split(
    tasks: Sequence[SymbolicTask],
    seed: int,
    render: RenderConfig,
    chat_text: Callable[[Messages], str] = chatml_text,
) -> list[RenderedRow]:
    """The tasks of one split (in task order; the split is the recipe's `n_prompts`) as rows, in
    output order. Row draws are functions of (seed, task_id), the shuffle of (seed, first
    task_id)."""
    rows = []
    for row_index, task in enumerate(tasks):
        rng = np.random.default_rng([seed, task.task_id, _RENDER_STREAM])
        random_index = render.recipe_order == "random"
        prompt_index = int(rng.integers(len(tasks))) if random_index else row_index
        prob = float(
            power_law(
                render.initial_prob,
                render.final_prob,
                render.alpha,
                render.scale,
                prompt_index,
                len(tasks),
            )
        )
        n_shown = min(render.examples_per_prompt or task.k, task.k)
        is_cot = tuple(bool(u < prob) for u in rng.random(n_shown))
        messages = chat_messages(task, is_cot)
        rows.append(
            RenderedRow(
                task=task,
                messages=messages,
                text=chat_text(messages),
                cot_example_prob=prob,
                is_cot=is_cot,
            )
        )
    if render.recipe_order == "shuffled" and rows:
        order = np.random.default_rng([seed, tasks[0].task_id, _SHUFFLE_STREAM]).permutation(
            len(rows)
        )
        rows = [rows[i] for i in order]
    return rows


def render_splits(
    seed: int,
    n_train: int,
    n_test: int,
    config: SymbolicConfig,
    render: RenderConfig,
    chat_text: Callable[[Messages], str] = chatml_text,
) -> dict[str, list[RenderedRow]]:
    """Both splits' rows (see the module docstring)."""
    render.check_against(config)
    return {
        split: render_split(generate(seed, task_ids, config), seed, render, chat_text)
        for split, task_ids in split_task_ids(n_train, n_test).items()
    }


def write_jsonl(path: str, rows: Sequence[RenderedRow]) -> None:
    """One row per line; written to a temporary name and renamed, never left half-written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row.to_json()) + "\n")
        os.replace(tmp, path)
    finally:  # a failed write (a full disk, `path` a directory) leaves no temporary file
        if os.path.exists(tmp):
            os.remove(tmp)


def read_tasks(path: str) -> list[SymbolicTask]:
    """The raw tasks of a written split, in task order (to render again, at another K)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return sorted((SymbolicTask.from_json(row) for row in rows), key=lambda t: t.task_id)


def define_task_flags() -> None:
    """The flags of a `SymbolicConfig` and a `RenderConfig` and `--tokenizer` (also used by
    `python -m cotlab_jax.tfds_builder --symbolic`)."""
    tasks, render = SymbolicConfig(), RenderConfig()
    flags.DEFINE_list("n_inputs", list(map(str, tasks.n_input_choices)), "Choices of n.")
    flags.DEFINE_list("n_parents", list(map(str, tasks.n_parent_choices)), "Choices of m.")
    flags.DEFINE_list("chain_length", list(map(str, tasks.chain_length_choices)), "Choices of c.")
    flags.DEFINE_list(
        "n_examples",
        list(map(str, tasks.n_example_choices)),
        "Choices of k, the examples stored per task.",
    )
    flags.DEFINE_integer("word_length", tasks.word_length, "Letters per input word.")
    flags.DEFINE_integer("char_offset", tasks.char_offset, "Alphabet shift of chain words.")
    flags.DEFINE_integer(
        "examples_per_prompt",
        None,
        "Examples shown per chat (the first ones; default: all stored).",
    )
    for name in ("initial_prob", "final_prob", "alpha", "scale"):
        flags.DEFINE_float(name, getattr(render, name), f"Power-law CoT recipe: {name}.")
    flags.DEFINE_enum(
        "recipe_order",
        render.recipe_order,
        list(RECIPE_ORDERS),
        "The recipe's row index: the row's, rows then shuffled (the reference's); "
        "a uniform draw; or the row's, rows in task order.",
    )
    flags.DEFINE_string(
        "tokenizer",
        None,
        "A saved transformers tokenizer (a local directory) "
        "whose chat template renders `text` (default: ChatML).",
    )


def configs_from_flags(f) -> tuple[SymbolicConfig, RenderConfig]:
    """The configs of the task flags; a bad value raises ValueError with a one-line message."""
    config = SymbolicConfig(
        n_input_choices=_int_choices("n_inputs", f.n_inputs),
        n_parent_choices=_int_choices("n_parents", f.n_parents),
        chain_length_choices=_int_choices("chain_length", f.chain_length),
        n_example_choices=_int_choices("n_examples", f.n_examples),
        word_length=f.word_length,
        char_offset=f.char_offset,
    )
    render = RenderConfig(
        examples_per_prompt=f.examples_per_prompt,
        initial_prob=f.initial_prob,
        final_prob=f.final_prob,
        alpha=f.alpha,
        scale=f.scale,
        recipe_order=f.recipe_order,
    )
    render.check_against(config)
    return config, render


def chat_text_from_flags(f) -> Callable[[Messages], str]:
    return chatml_text if f.tokenizer is None else tokenizer_chat_text(f.tokenizer)


def _int_choices(name: str, values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(
            f"--{name}={','.join(values)}: expected comma-separated integers"
        ) from None


def define_flags() -> None:
    flags.DEFINE_string("out_dir", None, "Directory for train.jsonl and test.jsonl.")
    flags.DEFINE_integer("n_train_tasks", DEFAULT_N_TRAIN, "Train tasks (the stream's first).")
    flags.DEFINE_integer("n_test_tasks", DEFAULT_N_TEST, "Test tasks (the next ones).")
    flags.DEFINE_integer("seed", DEFAULT_SEED, "Task t is a function of (seed, t).")
    define_task_flags()


@cli_errors.one_line
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if not f.out_dir:
        raise SystemExit("--out_dir is required")
    cli_errors.check_writable_dir("--out_dir", f.out_dir)
    for split in ("train", "test"):
        if os.path.isdir(os.path.join(f.out_dir, f"{split}.jsonl")):
            raise SystemExit(f"--out_dir={f.out_dir}: {split}.jsonl there is a directory")
    try:
        config, render = configs_from_flags(f)
        chat_text = chat_text_from_flags(f)
        splits = render_splits(f.seed, f.n_train_tasks, f.n_test_tasks, config, render, chat_text)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    for split, rows in splits.items():
        write_jsonl(os.path.join(f.out_dir, f"{split}.jsonl"), rows)
    print(f"wrote {f.n_train_tasks} train and {f.n_test_tasks} test chats to {f.out_dir}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
