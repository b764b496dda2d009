"""A TensorFlow Datasets builder materialising one task configuration (array_record, no TF).

Splits of the dataset built from a config (`configs/*.py`, as `cotlab_jax.main` takes it):
- `train`: the run's first `n_train_tasks` training tasks, exactly as the trainer draws them
  (`data.sample_batch` of steps `0 .. n_train_tasks / batch_size - 1`), in order.
- `test`: the run's frozen eval set (`data.build_eval_set`, `config.eval.n_eval_tasks` tasks from
  `seed + 1000`), in order; `read_split(dir, "test")` equals a run's `eval_set.npz`.

Features (version 1.0.0), one record per task, fixed shapes from the task spec (L = seq_len,
Lq = query_len, T = target_len, N/M/C/K the maxima; see `data.sample_tasks`): `task_id`;
`input_ids`, `labels`, `attention_mask`, `positions` [L]; `query_ids`, `query_mask`,
`query_positions` [Lq];
`target_ids` [T]; `inputs` [K, N]; `chain` [K, C]; `adj`, `parent_mask` [C, M]; `n`, `m`, `c`,
`k`; `is_cot` [K]; `n_cot`, `n_direct`; `cot_prob`. Every feature carries its doc in
`features.json`, and the task spec (JSON) is in the dataset's metadata.

Writing needs no TensorFlow: TFDS (4.9) writes array_record files with `file_format=
"array_record"`, and reads them back with `as_data_source()` (random access, NumPy). Records keep
generation order (`disable_shuffling`).

    python -m cotlab_jax.tfds_builder --config=configs/quickstart.py --data_dir=DIR \\
        [--n_train_tasks=N]

A second builder, `SymbolicChats` (version 2.0.0), holds the symbolic string tasks
(`cotlab_jax.symbolic`, format in docs/symbolic.md) as rendered chats, for fine-tuning or prompting
pretrained LLMs. Its config (`SymbolicChatsConfig.create`) is a `symbolic.SymbolicConfig` (raw
tasks), a `symbolic.RenderConfig` (examples per chat, CoT recipe), a seed, the two split sizes and
optionally a tokenizer directory whose chat template renders `text`. The splits hold exactly the
rows `python -m cotlab_jax.symbolic` writes to train.jsonl and test.jsonl, in the same order
(`symbolic.render_splits`): train renders tasks 0 .. n_train - 1 of the seed's stream, test the
next n_test (one stream, as the reference; defaults seed 42, 1,000 and 10,000). Features
(`symbolic_feature_docs`): `task_id`; the raw fields of every stored example (`input_words`,
`intermediate_words`, `answer_word`, sorted `adj_list`, padded); `n`, `m`, `c`, `k`; the chat as
`messages` (JSON) and `text`; `answer`; `n_rendered`, `is_cot`, `n_cot`; `cot_example_prob`. The
configs (JSON), seed, tokenizer and split task ids are in the metadata. `read_split` reads the
fields (strings as `str`), `read_symbolic_split` one dict per row, as the JSONL rows.

    python -m cotlab_jax.tfds_builder --symbolic --data_dir=DIR [--n_train_tasks=1000
        --n_test_tasks=10000 --seed=42 --examples_per_prompt=K --tokenizer=PATH
        --n_inputs=4 --n_parents=2 ... as cotlab_jax.symbolic]
"""

import dataclasses
import hashlib
import json
import os

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from ml_collections import config_flags

from cotlab_jax import cli_errors, data, symbolic
from cotlab_jax import config as config_lib

FILE_FORMAT = "array_record"


def feature_docs(spec: data.TaskSpec) -> dict[str, tuple[tuple[int, ...], np.dtype, str]]:
    """Every feature's (shape, dtype, doc); the order and meaning are those of
    `data.sample_tasks`."""
    L, Lq, T = spec.seq_len, spec.query_len, spec.target_len
    N, M, C, K = spec.N, spec.M, spec.C, spec.K
    i32, b, f32 = np.int32, np.bool_, np.float32
    return {
        "task_id": ((), i32, "The task's index in its split (train: step * batch_size + b)."),
        "input_ids": ((L,), i32, "Training tokens, left-padded with the pad id."),
        "labels": ((L,), i32, "Aligned with input_ids; -100 where no loss is taken."),
        "attention_mask": ((L,), b, "False on padding."),
        "positions": ((L,), i32, "Rotary positions counting real tokens only."),
        "query_ids": ((Lq,), i32, "Evaluation prompt: k-1 examples, then the last one's inputs."),
        "query_mask": ((Lq,), b, "False on the query's padding."),
        "query_positions": ((Lq,), i32, "Positions of the query tokens."),
        "target_ids": ((T,), i32, "The last example's labelled tokens, then -100."),
        "inputs": ((K, N), i32, "Input tokens; -1 beyond n or k."),
        "chain": ((K, C), i32, "Chain tokens; -1 beyond c or k. chain[k-1, c-1] is the answer."),
        "adj": ((C, M), i32, "DAG parents (index < n: input, n + j: chain token j); -1 masked."),
        "parent_mask": ((C, M), b, "Which adj entries are parents."),
        "n": ((), i32, "Inputs per example."),
        "m": ((), i32, "Parents per chain token."),
        "c": ((), i32, "Chain length."),
        "k": ((), i32, "Examples in the task."),
        "is_cot": ((K,), b, "Whether each example is in CoT form (False beyond k)."),
        "n_cot": ((), i32, "CoT examples."),
        "n_direct": ((), i32, "Direct-answer examples."),
        "cot_prob": ((), f32, "The CoT probability the task was drawn with."),
    }


@dataclasses.dataclass(eq=False)
class CotIclConfig(tfds.core.BuilderConfig):
    """One task configuration: the run config (JSON) and how many training tasks to write."""

    run_config_json: str = dataclasses.field(default="", repr=False)  # TFDS logs the repr
    n_train_tasks: int = 0

    @classmethod
    def from_run_config(
        cls, run_config: ml_collections.ConfigDict, n_train_tasks: int
    ) -> "CotIclConfig":
        """Named by the run name and a hash of everything that decides the records."""
        config_lib.validate_train(run_config.train)
        data.TaskSpec.from_config(run_config)  # validates config.data before anything is written
        batch_size = run_config.train.batch_size
        if not (
            isinstance(n_train_tasks, int) and n_train_tasks > 0 and n_train_tasks % batch_size == 0
        ):
            raise ValueError(
                f"n_train_tasks={n_train_tasks!r}: expected a positive multiple of "
                f"train.batch_size={batch_size}"
            )
        config_json = run_config.to_json(sort_keys=True)
        digest = hashlib.sha256(f"{config_json}|{n_train_tasks}".encode()).hexdigest()[:12]
        return cls(
            name=f"{config_lib.run_name(run_config)}_train_{n_train_tasks}_{digest}",
            description=f"{n_train_tasks} training tasks and the frozen eval set of "
            f"{config_lib.run_name(run_config)}.",
            run_config_json=config_json,
            n_train_tasks=n_train_tasks,
        )

    @property
    def run_config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(json.loads(self.run_config_json))


class CotIcl(tfds.core.GeneratorBasedBuilder):
    """CoT-ICL tasks of one configuration; build with `build(run_config, data_dir, ...)`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Train tasks and the frozen eval set, all sample_tasks fields."}
    # No files ship beside this builder (nothing is downloaded, so no checksums); TFDS 4.9 would
    # look for them through `importlib_resources`, which it does not install (ModuleNotFoundError).
    code_path = None

    @property
    def spec(self) -> data.TaskSpec:
        return data.TaskSpec.from_config(self.builder_config.run_config)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            name: tfds.features.Tensor(shape=shape, dtype=dtype, doc=doc)
            for name, (shape, dtype, doc) in feature_docs(self.spec).items()
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                spec=data.spec_json(self.spec), run_config=self.builder_config.run_config_json
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        for start, tasks in _task_chunks(self.builder_config, split):
            for row in range(len(tasks["k"])):
                yield (
                    start + row,
                    dict(
                        task_id=np.int32(start + row),
                        **{name: value[row] for name, value in tasks.items()},
                    ),
                )


def _task_chunks(builder_config: CotIclConfig, split: str):
    """(first task id, fields of a chunk of tasks) of a split, in order."""
    run_config = builder_config.run_config
    spec = data.TaskSpec.from_config(run_config)
    keys = data.root_keys(run_config.seed)
    world = data.make_world(keys["world"], spec)
    if split == "test":
        yield 0, data.build_eval_set(world, keys["eval"], spec, run_config.eval.n_eval_tasks)
        return
    batch_size = run_config.train.batch_size
    for step in range(builder_config.n_train_tasks // batch_size):
        batch = data.sample_batch(world, keys["train"], step, spec, batch_size)
        yield step * batch_size, jax.tree.map(np.asarray, batch)


def build(run_config: ml_collections.ConfigDict, data_dir: str, n_train_tasks: int) -> str:
    """Writes (or finds already written) the dataset; returns its directory."""
    builder = CotIcl(
        config=CotIclConfig.from_run_config(run_config, n_train_tasks),
        data_dir=data_dir,
        file_format=FILE_FORMAT,
    )
    builder.download_and_prepare()
    return os.fspath(builder.data_path)


def read_split(dataset_dir: str, split: str) -> dict[str, np.ndarray]:
    """A split as stacked NumPy arrays (the `data.sample_tasks` fields and `task_id`; for
    `SymbolicChats`, its features, text and strings as object arrays of `str`), read with
    `tfds.builder_from_directory` (no builder code, no TensorFlow)."""
    builder = tfds.builder_from_directory(dataset_dir)
    source = builder.as_data_source()[split]
    records = [source[i] for i in range(len(source))]
    # Scalars come back as Python numbers: the stored dtype restores int32 / float32. Text and
    # string tensors come back as UTF-8 bytes.
    return {
        name: np.asarray([_decoded(r[name]) for r in records], feature.np_dtype)
        for name, feature in builder.info.features.items()
    }


def _decoded(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype == object:
        return np.vectorize(bytes.decode, otypes=[object])(value) if value.size else value
    return value


def dataset_spec_json(dataset_dir: str) -> str:
    """The task spec (JSON) the dataset was made from, to check it against a run's."""
    return tfds.builder_from_directory(dataset_dir).info.metadata["spec"]


def load_eval_set(dataset_dir: str, spec: data.TaskSpec) -> dict[str, np.ndarray]:
    """The `test` split as an eval set for `evaluate.evaluate` (as `data.load_eval_set`);
    refuses a dataset made from another task spec."""
    if dataset_spec_json(dataset_dir) != data.spec_json(spec):
        raise ValueError(
            f"dataset {dataset_dir} was made from another task spec: "
            f"{dataset_spec_json(dataset_dir)}"
        )
    eval_set = read_split(dataset_dir, "test")
    del eval_set["task_id"]
    return eval_set


# Symbolic string tasks (cotlab_jax.symbolic, docs/symbolic.md) as rendered chats.


def symbolic_feature_docs(config: symbolic.SymbolicConfig) -> dict[str, tuple]:
    """Every feature's (shape, dtype, doc) for `SymbolicChats`; dtype `None` is a text feature,
    `np.str_` a tensor of strings. K, N, M, C are the largest k, n, m, c choices."""
    K, N = max(config.n_example_choices), max(config.n_input_choices)
    M, C = max(config.n_parent_choices), max(config.chain_length_choices)
    i32, b, f32, s = np.int32, np.bool_, np.float32, np.str_
    return {
        "task_id": (
            (),
            i32,
            "The raw task: symbolic.sample_task(seed, task_id, config); the "
            "train split holds task ids 0 .. n_train - 1, the test split the "
            "next n_test.",
        ),
        "input_words": ((K, N), s, "Each stored example's input words; '' beyond n or k."),
        "intermediate_words": (
            (K, C - 1),
            s,
            "Each stored example's chain words before the "
            "last (the Step lines); '' beyond c - 1 or k.",
        ),
        "answer_word": ((K,), s, "Each stored example's last chain word; '' beyond k."),
        "adj_list": (
            (K, C, M),
            i32,
            "Each stored example's DAG (the same for all): the sorted "
            "parents of every chain word (index < n: input word, n + j: "
            "chain word j); -1 beyond c, m or k.",
        ),
        "n": ((), i32, "Input words per example."),
        "m": ((), i32, "Parents per chain word."),
        "c": ((), i32, "Chain words per example."),
        "k": ((), i32, "Examples stored in the raw task."),
        "messages": (
            (),
            None,
            "The chat (symbolic.chat_messages) as a JSON list of {role, "
            "content}: the system prompt, then a user/assistant turn pair for "
            "each of the first n_rendered examples.",
        ),
        "text": ((), None, "The chat as one string: ChatML, or the --tokenizer's chat template."),
        "answer": ((), None, "The last rendered example's answer word (the last turn's box)."),
        "n_rendered": ((), i32, "Examples in the chat: min(examples_per_prompt, k)."),
        "is_cot": (
            (K,),
            b,
            "Whether each rendered example's answer is in CoT form (think "
            "block, then final answer); False beyond n_rendered.",
        ),
        "n_cot": ((), i32, "CoT examples (is_cot.sum())."),
        "cot_example_prob": ((), f32, "The recipe's CoT probability of the row (float32)."),
    }


def symbolic_config_json(config) -> str:
    """A SymbolicConfig or RenderConfig as sorted JSON, float fields as floats (alpha=1 is
    alpha=1.0)."""
    fields = dataclasses.asdict(config)
    for field in dataclasses.fields(config):
        if field.type is float:
            fields[field.name] = float(fields[field.name])
    return json.dumps(fields, sort_keys=True)


def _tokenizer_digest(path: str) -> str:
    """A hash of the tokenizer directory's files: its chat template decides `text`."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


@dataclasses.dataclass(eq=False)
class SymbolicChatsConfig(tfds.core.BuilderConfig):
    """Raw task distribution and rendering (as JSON), seed, split sizes and tokenizer."""

    symbolic_config_json: str = dataclasses.field(default="", repr=False)
    render_config_json: str = dataclasses.field(default="", repr=False)
    seed: int = symbolic.DEFAULT_SEED
    n_train: int = 0
    n_test: int = 0
    tokenizer: str = ""

    @classmethod
    def create(
        cls,
        config: symbolic.SymbolicConfig,
        render: symbolic.RenderConfig,
        n_train: int = symbolic.DEFAULT_N_TRAIN,
        n_test: int = symbolic.DEFAULT_N_TEST,
        seed: int = symbolic.DEFAULT_SEED,
        tokenizer: str | None = None,
    ) -> "SymbolicChatsConfig":
        """Named by the sizes, the seed and a hash of everything that decides the records."""
        if not isinstance(config, symbolic.SymbolicConfig):
            raise ValueError(f"config={config!r}: expected a symbolic.SymbolicConfig")
        if not isinstance(render, symbolic.RenderConfig):
            raise ValueError(f"render={render!r}: expected a symbolic.RenderConfig")
        render.check_against(config)
        symbolic.split_task_ids(n_train, n_test)  # validates the sizes
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed={seed!r}: expected a non-negative integer")
        if tokenizer is not None:
            symbolic.tokenizer_chat_text(tokenizer)  # validates the tokenizer
        config_json, render_json = symbolic_config_json(config), symbolic_config_json(render)
        template = "chatml" if tokenizer is None else _tokenizer_digest(tokenizer)
        digest = hashlib.sha256(
            f"{config_json}|{render_json}|{seed}|{n_train}|{n_test}|{template}".encode()
        ).hexdigest()[:12]
        return cls(
            name=f"seed{seed}_train{n_train}_test{n_test}_{digest}",
            description=f"{n_train} training and {n_test} test chats of the symbolic "
            f"string tasks (docs/symbolic.md), seed {seed}.",
            symbolic_config_json=config_json,
            render_config_json=render_json,
            seed=seed,
            n_train=n_train,
            n_test=n_test,
            tokenizer=tokenizer or "",
        )

    @property
    def symbolic_config(self) -> symbolic.SymbolicConfig:
        return _config_from_json(symbolic.SymbolicConfig, self.symbolic_config_json)

    @property
    def render_config(self) -> symbolic.RenderConfig:
        return _config_from_json(symbolic.RenderConfig, self.render_config_json)


def _config_from_json(cls, text: str):
    fields = json.loads(text)
    return cls(
        **{
            name: tuple(value) if isinstance(value, list) else value
            for name, value in fields.items()
        }
    )


class SymbolicChats(tfds.core.GeneratorBasedBuilder):
    """Symbolic string task chats; build with `build_symbolic(config, render, data_dir, ...)`."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Train/test chats (JSON messages), answer, n/m/c/k, CoT flags.",
        "2.0.0": "The reference's chat text, raw example fields, one task stream for both "
        "splits, rows in the recipe's order.",
    }
    code_path = None  # as CotIcl: no files ship beside the builder

    def _info(self) -> tfds.core.DatasetInfo:
        features = {}
        for name, (shape, dtype, doc) in symbolic_feature_docs(
            self.builder_config.symbolic_config
        ).items():
            features[name] = (
                tfds.features.Text(doc=doc)
                if dtype is None
                else tfds.features.Tensor(shape=shape, dtype=dtype, doc=doc)
            )
        task_ids = symbolic.split_task_ids(self.builder_config.n_train, self.builder_config.n_test)
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                symbolic_config=self.builder_config.symbolic_config_json,
                render_config=self.builder_config.render_config_json,
                seed=self.builder_config.seed,
                tokenizer=self.builder_config.tokenizer,
                task_ids={split: [ids.start, ids.stop] for split, ids in task_ids.items()},
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        builder_config = self.builder_config
        config = builder_config.symbolic_config
        task_ids = symbolic.split_task_ids(builder_config.n_train, builder_config.n_test)[split]
        chat_text = (
            symbolic.tokenizer_chat_text(builder_config.tokenizer)
            if builder_config.tokenizer
            else symbolic.chatml_text
        )
        rows = symbolic.render_split(
            symbolic.generate(builder_config.seed, task_ids, config),
            builder_config.seed,
            builder_config.render_config,
            chat_text,
        )
        for position, row in enumerate(rows):
            yield position, symbolic_record(row, config)


def symbolic_record(row: symbolic.RenderedRow, config: symbolic.SymbolicConfig) -> dict:
    """One `SymbolicChats` record: a rendered row, the raw examples padded to the features'
    shapes."""
    shapes = {name: shape for name, (shape, _, _) in symbolic_feature_docs(config).items()}
    task = row.task
    input_words = np.full(shapes["input_words"], "", object)
    intermediate_words = np.full(shapes["intermediate_words"], "", object)
    answer_word = np.full(shapes["answer_word"], "", object)
    adj_list = np.full(shapes["adj_list"], -1, np.int32)
    for e, example in enumerate(task.examples):
        input_words[e, : task.n] = example.input_words
        intermediate_words[e, : task.c - 1] = example.intermediate_words
        answer_word[e] = example.answer_word
        adj_list[e, : task.c, : task.m] = example.adj_list
    is_cot = np.zeros(shapes["is_cot"], np.bool_)
    is_cot[: len(row.is_cot)] = row.is_cot
    return dict(
        task_id=np.int32(task.task_id),
        input_words=input_words,
        intermediate_words=intermediate_words,
        answer_word=answer_word,
        adj_list=adj_list,
        n=np.int32(task.n),
        m=np.int32(task.m),
        c=np.int32(task.c),
        k=np.int32(task.k),
        messages=json.dumps(row.messages),
        text=row.text,
        answer=task.examples[len(row.is_cot) - 1].answer_word,
        n_rendered=np.int32(len(row.is_cot)),
        is_cot=is_cot,
        n_cot=np.int32(sum(row.is_cot)),
        cot_example_prob=np.float32(row.cot_example_prob),
    )


def build_symbolic(
    config: symbolic.SymbolicConfig,
    render: symbolic.RenderConfig,
    data_dir: str,
    n_train: int = symbolic.DEFAULT_N_TRAIN,
    n_test: int = symbolic.DEFAULT_N_TEST,
    seed: int = symbolic.DEFAULT_SEED,
    tokenizer: str | None = None,
) -> str:
    """Writes (or finds already written) the symbolic chats dataset; returns its directory."""
    builder = SymbolicChats(
        config=SymbolicChatsConfig.create(config, render, n_train, n_test, seed, tokenizer),
        data_dir=data_dir,
        file_format=FILE_FORMAT,
    )
    builder.download_and_prepare()
    return os.fspath(builder.data_path)


def read_symbolic_split(dataset_dir: str, split: str) -> list[dict]:
    """A `SymbolicChats` split as rows in their stored order, each as `RenderedRow.to_json()`
    (what `symbolic.write_jsonl` writes; `cot_example_prob` as stored, float32)."""
    fields = read_split(dataset_dir, split)
    rows = []
    for i in range(len(fields["task_id"])):
        n, m, c, k = (int(fields[name][i]) for name in ("n", "m", "c", "k"))
        examples = [
            dict(
                input_words=list(fields["input_words"][i, e, :n]),
                intermediate_words=list(fields["intermediate_words"][i, e, : c - 1]),
                answer_word=fields["answer_word"][i, e],
                adj_list=fields["adj_list"][i, e, :c, :m].tolist(),
            )
            for e in range(k)
        ]
        rows.append(
            dict(
                task_id=int(fields["task_id"][i]),
                examples=examples,
                messages=json.loads(fields["messages"][i]),
                text=fields["text"][i],
                cot_example_prob=float(fields["cot_example_prob"][i]),
                is_cot=fields["is_cot"][i, : fields["n_rendered"][i]].tolist(),
            )
        )
    return rows


def define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py[:arg]).", lock_config=False
    )
    flags.DEFINE_string("data_dir", None, "TFDS data directory to write into.")
    flags.DEFINE_integer(
        "n_train_tasks",
        None,
        "Training tasks to write (default: one batch; 1000 with --symbolic).",
        lower_bound=1,
    )
    # --symbolic: the SymbolicChats builder, with cotlab_jax.symbolic's task flags.
    flags.DEFINE_bool(
        "symbolic",
        False,
        "Build SymbolicChats (symbolic string task chats, "
        "docs/symbolic.md) instead of a --config's token tasks.",
    )
    flags.DEFINE_integer(
        "n_test_tasks", symbolic.DEFAULT_N_TEST, "(--symbolic) Test chats.", lower_bound=1
    )
    flags.DEFINE_integer(
        "seed",
        symbolic.DEFAULT_SEED,
        "(--symbolic) Task t is a function of (seed, t).",
        lower_bound=0,
    )
    symbolic.define_task_flags()


def _symbolic_main(f) -> str:
    if f.config is not None:
        raise SystemExit("--symbolic takes no --config")
    if not f.data_dir:
        raise SystemExit("--symbolic needs --data_dir")
    config, render = symbolic.configs_from_flags(f)
    return build_symbolic(
        config,
        render,
        f.data_dir,
        f.n_train_tasks or symbolic.DEFAULT_N_TRAIN,
        f.n_test_tasks,
        f.seed,
        f.tokenizer,
    )


@cli_errors.one_line  # an unwritable --data_dir (OSError) ends in one line too
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if f.data_dir:
        cli_errors.check_writable_dir("--data_dir", f.data_dir)
    try:
        if f.symbolic:
            path = _symbolic_main(f)
        else:
            run_config = f.config
            if run_config is None or not f.data_dir:
                raise SystemExit("--config and --data_dir are required")
            path = build(run_config, f.data_dir, f.n_train_tasks or run_config.train.batch_size)
    except (ValueError, config_lib.ConfigError) as error:
        raise SystemExit(str(error)) from None
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
