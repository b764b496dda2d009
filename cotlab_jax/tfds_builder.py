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

A second builder, `SymbolicChats` (version 1.0.0), holds the symbolic string tasks of DESIGN 1.7
(`cotlab_jax.symbolic`) as chats, for fine-tuning or prompting pretrained LLMs. Its config is a
`symbolic.SymbolicConfig`, a seed and the two split sizes (`SymbolicChatsConfig.create`):
- `train`: `symbolic.sample_task(seed, i, n_train, config)` for i = 0 .. n_train - 1, in order,
  i.e. the chats `symbolic.write_jsonl(path, n_train, seed, config)` writes.
- `test`: `symbolic.sample_task(seed + 1000, i, n_test, config)` for i = 0 .. n_test - 1: another
  seed (as the token tasks' eval set), not another index range, so the test split does not change
  with n_train. Each split is its own recipe denominator (`n_tasks` of `sample_task`).
Features (`symbolic_feature_docs`): `task_id`, `messages` (the `render_chat` chat as a JSON
string), `answer`, `n`, `m`, `c`, `k`, `is_cot` [K] (K the largest k choice), `n_cot`,
`cot_prob`; the SymbolicConfig (JSON) and the seed are in the metadata. `read_split` reads it
(text as `str`, `messages` still JSON), `read_symbolic_split` as one dict per chat with the
messages parsed.

    python -m cotlab_jax.tfds_builder --symbolic --data_dir=DIR --n_train_tasks=N \\
        [--n_test_tasks=100] [--seed=0] [--n_inputs=4 --n_parents=2 ... as cotlab_jax.symbolic]
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

from cotlab_jax import config as config_lib
from cotlab_jax import data, symbolic

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
    def from_run_config(cls, run_config: ml_collections.ConfigDict,
                        n_train_tasks: int) -> "CotIclConfig":
        """Named by the run name and a hash of everything that decides the records."""
        config_lib.validate_train(run_config.train)
        data.TaskSpec.from_config(run_config)  # validates config.data before anything is written
        batch_size = run_config.train.batch_size
        if not (isinstance(n_train_tasks, int) and n_train_tasks > 0
                and n_train_tasks % batch_size == 0):
            raise ValueError(f"n_train_tasks={n_train_tasks!r}: expected a positive multiple of "
                             f"train.batch_size={batch_size}")
        config_json = run_config.to_json(sort_keys=True)
        digest = hashlib.sha256(f"{config_json}|{n_train_tasks}".encode()).hexdigest()[:12]
        return cls(name=f"{config_lib.run_name(run_config)}_train_{n_train_tasks}_{digest}",
                   description=f"{n_train_tasks} training tasks and the frozen eval set of "
                               f"{config_lib.run_name(run_config)}.",
                   run_config_json=config_json, n_train_tasks=n_train_tasks)

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
        features = {name: tfds.features.Tensor(shape=shape, dtype=dtype, doc=doc)
                    for name, (shape, dtype, doc) in feature_docs(self.spec).items()}
        return tfds.core.DatasetInfo(
            builder=self, description=self.builder_config.description,
            features=tfds.features.FeaturesDict(features), disable_shuffling=True,
            metadata=tfds.core.MetadataDict(spec=data.spec_json(self.spec),
                                            run_config=self.builder_config.run_config_json))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"),
                "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        for start, tasks in _task_chunks(self.builder_config, split):
            for row in range(len(tasks["k"])):
                yield start + row, dict(task_id=np.int32(start + row),
                                        **{name: value[row] for name, value in tasks.items()})


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
    builder = CotIcl(config=CotIclConfig.from_run_config(run_config, n_train_tasks),
                     data_dir=data_dir, file_format=FILE_FORMAT)
    builder.download_and_prepare()
    return os.fspath(builder.data_path)


def read_split(dataset_dir: str, split: str) -> dict[str, np.ndarray]:
    """A split as stacked NumPy arrays (the `data.sample_tasks` fields and `task_id`; for
    `SymbolicChats`, its features, text as object arrays of `str`), read with
    `tfds.builder_from_directory` (no builder code, no TensorFlow)."""
    builder = tfds.builder_from_directory(dataset_dir)
    source = builder.as_data_source()[split]
    records = [source[i] for i in range(len(source))]
    # Scalars come back as Python numbers: the stored dtype restores int32 / float32. Text comes
    # back as UTF-8 bytes.
    return {name: np.asarray([r[name].decode() if isinstance(feature, tfds.features.Text)
                              else r[name] for r in records], feature.np_dtype)
            for name, feature in builder.info.features.items()}


def dataset_spec_json(dataset_dir: str) -> str:
    """The task spec (JSON) the dataset was made from, to check it against a run's."""
    return tfds.builder_from_directory(dataset_dir).info.metadata["spec"]


def load_eval_set(dataset_dir: str, spec: data.TaskSpec) -> dict[str, np.ndarray]:
    """The `test` split as an eval set for `evaluate.evaluate` (as `data.load_eval_set`);
    refuses a dataset made from another task spec."""
    if dataset_spec_json(dataset_dir) != data.spec_json(spec):
        raise ValueError(f"dataset {dataset_dir} was made from another task spec: "
                         f"{dataset_spec_json(dataset_dir)}")
    eval_set = read_split(dataset_dir, "test")
    del eval_set["task_id"]
    return eval_set


# Symbolic string tasks (DESIGN 1.7) as chats.

SYMBOLIC_TEST_SEED_OFFSET = 1000  # test split seed = seed + 1000, as data.root_keys' eval key


def symbolic_feature_docs(config: symbolic.SymbolicConfig) -> dict[str, tuple]:
    """Every feature's (shape, dtype, doc) for `SymbolicChats`; dtype `None` is a text feature."""
    K = max(config.n_example_choices)
    i32, b, f32 = np.int32, np.bool_, np.float32
    return {
        "task_id": ((), i32, "The task's index i in its split: symbolic.sample_task(seed', i, "
                             "split size, config), seed' = seed (train) or seed + 1000 (test)."),
        "messages": ((), None, "The chat, symbolic.render_chat(task), as a JSON list of "
                               "{role, content}: the system prompt, then a user/assistant turn "
                               "pair per example; the last assistant turn is the target."),
        "answer": ((), None, "The last example's last chain word (the boxed answer)."),
        "n": ((), i32, "Input words per example."),
        "m": ((), i32, "Parents per chain word."),
        "c": ((), i32, "Chain words per example."),
        "k": ((), i32, "Examples (user/assistant turn pairs) in the chat."),
        "is_cot": ((K,), b, "Whether each example's answer is in CoT form (Step lines, then the "
                            "boxed answer); False beyond k."),
        "n_cot": ((), i32, "CoT examples (is_cot.sum())."),
        "cot_prob": ((), f32, "The CoT probability the task was drawn with (the recipe)."),
    }


def symbolic_config_json(config: symbolic.SymbolicConfig) -> str:
    """The config as sorted JSON, numbers of float fields as floats (alpha=1 is alpha=1.0)."""
    fields = dataclasses.asdict(config)
    for name in ("initial_prob", "final_prob", "alpha", "scale"):
        fields[name] = float(fields[name])
    return json.dumps(fields, sort_keys=True)


@dataclasses.dataclass(eq=False)
class SymbolicChatsConfig(tfds.core.BuilderConfig):
    """A symbolic task distribution (SymbolicConfig as JSON), its seed and the split sizes."""

    symbolic_config_json: str = dataclasses.field(default="", repr=False)
    seed: int = 0
    n_train: int = 0
    n_test: int = 0

    @classmethod
    def create(cls, config: symbolic.SymbolicConfig, n_train: int, n_test: int,
               seed: int = 0) -> "SymbolicChatsConfig":
        """Named by the sizes, the seed and a hash of everything that decides the records."""
        if not isinstance(config, symbolic.SymbolicConfig):
            raise ValueError(f"config={config!r}: expected a symbolic.SymbolicConfig")
        for name, value in (("n_train", n_train), ("n_test", n_test)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed={seed!r}: expected a non-negative integer")
        config_json = symbolic_config_json(config)
        digest = hashlib.sha256(
            f"{config_json}|{seed}|{n_train}|{n_test}".encode()).hexdigest()[:12]
        return cls(name=f"seed{seed}_train{n_train}_test{n_test}_{digest}",
                   description=f"{n_train} training and {n_test} test chats of the symbolic "
                               f"string tasks (DESIGN 1.7), seed {seed}.",
                   symbolic_config_json=config_json, seed=seed, n_train=n_train, n_test=n_test)

    @property
    def symbolic_config(self) -> symbolic.SymbolicConfig:
        fields = json.loads(self.symbolic_config_json)
        return symbolic.SymbolicConfig(**{name: tuple(value) if isinstance(value, list) else value
                                          for name, value in fields.items()})


class SymbolicChats(tfds.core.GeneratorBasedBuilder):
    """Symbolic string task chats; build with `build_symbolic(config, data_dir, ...)`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Train/test chats (JSON messages), answer, n/m/c/k, CoT flags."}
    code_path = None  # as CotIcl: no files ship beside the builder

    def _info(self) -> tfds.core.DatasetInfo:
        features = {}
        for name, (shape, dtype, doc) in symbolic_feature_docs(
                self.builder_config.symbolic_config).items():
            features[name] = (tfds.features.Text(doc=doc) if dtype is None else
                              tfds.features.Tensor(shape=shape, dtype=dtype, doc=doc))
        return tfds.core.DatasetInfo(
            builder=self, description=self.builder_config.description,
            features=tfds.features.FeaturesDict(features), disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                symbolic_config=self.builder_config.symbolic_config_json,
                seed=self.builder_config.seed,
                test_seed=self.builder_config.seed + SYMBOLIC_TEST_SEED_OFFSET))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"),
                "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        max_k = max(self.builder_config.symbolic_config.n_example_choices)
        for index, task in enumerate(_symbolic_tasks(self.builder_config, split)):
            yield index, symbolic_record(index, task, max_k)


def _symbolic_tasks(builder_config: SymbolicChatsConfig, split: str):
    """The split's tasks, in order (see the module docstring)."""
    config = builder_config.symbolic_config
    if split == "train":
        return symbolic.generate(builder_config.n_train, builder_config.seed, config)
    return symbolic.generate(builder_config.n_test,
                             builder_config.seed + SYMBOLIC_TEST_SEED_OFFSET, config)


def symbolic_record(task_id: int, task: symbolic.SymbolicTask, max_k: int) -> dict:
    """One `SymbolicChats` record of a task."""
    is_cot = np.zeros(max_k, np.bool_)
    is_cot[:task.k] = task.is_cot
    return dict(task_id=np.int32(task_id), messages=json.dumps(symbolic.render_chat(task)),
                answer=task.chain[task.k - 1][task.c - 1], n=np.int32(task.n),
                m=np.int32(task.m), c=np.int32(task.c), k=np.int32(task.k), is_cot=is_cot,
                n_cot=np.int32(sum(task.is_cot)), cot_prob=np.float32(task.cot_prob))


def build_symbolic(config: symbolic.SymbolicConfig, data_dir: str, n_train: int, n_test: int,
                   seed: int = 0) -> str:
    """Writes (or finds already written) the symbolic chats dataset; returns its directory."""
    builder = SymbolicChats(config=SymbolicChatsConfig.create(config, n_train, n_test, seed),
                            data_dir=data_dir, file_format=FILE_FORMAT)
    builder.download_and_prepare()
    return os.fspath(builder.data_path)


def read_symbolic_split(dataset_dir: str, split: str) -> list[dict]:
    """A `SymbolicChats` split as one dict per chat: `messages` parsed (the `render_chat` list),
    text as `str`, scalars as Python numbers, `is_cot` cut to the task's k examples."""
    fields = read_split(dataset_dir, split)
    records = []
    for i in range(len(fields["task_id"])):
        record = {name: value[i] if value.dtype == object else value[i].item()
                  for name, value in fields.items() if name != "is_cot"}
        record["messages"] = json.loads(record["messages"])
        record["is_cot"] = [bool(v) for v in fields["is_cot"][i][:record["k"]]]
        records.append(record)
    return records


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                    lock_config=False)
    flags.DEFINE_string("data_dir", None, "TFDS data directory to write into.")
    flags.DEFINE_integer("n_train_tasks", None,
                         "Training tasks to write (default: one batch; required with --symbolic).",
                         lower_bound=1)
    # --symbolic: the SymbolicChats builder, with cotlab_jax.symbolic's task flags.
    flags.DEFINE_bool("symbolic", False, "Build SymbolicChats (DESIGN 1.7 chats) instead of a "
                                         "--config's token tasks.")
    flags.DEFINE_integer("n_test_tasks", 100, "(--symbolic) Test chats to write.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "(--symbolic) Train task i is a function of (seed, i), test "
                                    "task i of (seed + 1000, i).", lower_bound=0)
    symbolic.define_task_flags()


def _symbolic_main(f) -> str:
    if f.config is not None:
        raise SystemExit("--symbolic takes no --config")
    if not f.data_dir or f.n_train_tasks is None:
        raise SystemExit("--symbolic needs --data_dir and --n_train_tasks")
    config = symbolic.config_from_flags(f)
    return build_symbolic(config, f.data_dir, f.n_train_tasks, f.n_test_tasks, f.seed)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
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
