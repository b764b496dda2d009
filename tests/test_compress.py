"""The compression pipeline: stage run directories, resumption after a kill in every stage,
the report, sweeps over its fields, a Hugging Face teacher, and one-line errors."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from model_helpers import tiny_config
from test_distill import CONFIGS, ROOT, load_config

from cotlab_jax import (
    compress,
    data,
    distill,
    evaluate,
    experiment,
    export,
    model,
    rundir,
    sweep,
    train,
)
from cotlab_jax.metrics import read_metrics

TIMING = ("tokens_per_s", "step_time_s", "seconds", "source")
DECODING = ("tasks_per_s", "speed_vs_teacher")


class KilledError(Exception):
    """Stands for the process dying at that point."""


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Programs compiled once for the module: every pipeline here compiles the same ones, and a
    resumed stage compiles its step again."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: jax.config.values[name] for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random one-layer Llama of `tiny.py`'s task, as a Hugging Face directory (its quality
    does not matter here; an HF teacher also exercises `--task_config`)."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    task = load_config("tiny")
    task.model.num_hidden_layers = 1
    spec = data.TaskSpec.from_config(task)
    llama = experiment.model_config(task, spec)
    _, params = model.init(llama, jax.random.key(3))
    export.write_hf_dir(workdir, params, llama, spec)
    return workdir


def pipeline_config(teacher_dir, arg=None):
    config = load_config("tiny_compress", arg)
    config.compress.teacher = teacher_dir
    config.compress.task_config = os.path.join(CONFIGS, "tiny.py")
    return config


def stage_records(workdir):
    """Every stage's metrics, the teacher's record and the report, less timings."""
    out = {}
    for stage in compress.STAGES:
        out[stage] = [
            {k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(os.path.join(workdir, stage, "metrics.jsonl"))
        ]
    with open(os.path.join(workdir, "teacher.json")) as f:
        out["teacher"] = json.load(f)
    with open(os.path.join(workdir, "report", "compress.json")) as f:
        out["report"] = [
            {k: v for k, v in row.items() if k not in DECODING} for row in json.load(f)["stages"]
        ]
    return out


@pytest.fixture(scope="module")
def uninterrupted(teacher, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    outcome = compress.run_pipeline(pipeline_config(teacher), workdir)
    return workdir, outcome


def test_every_stage_is_a_run_directory(uninterrupted):
    workdir, outcome = uninterrupted
    rows = {row["stage"]: row for row in outcome["report"]["rows"]}
    assert list(rows) == ["teacher", "distill", "prune", "redistill", "quantize"]
    for stage in compress.STAGES:
        run = rundir.load_run(os.path.join(workdir, stage))  # what evaluate/export load
        assert model.count_params(run.params) == rows[stage]["params"]
    # Half the MLP neurons go; the quantized model stores its layer weights in int8.
    assert rows["prune"]["mlp"] == rows["distill"]["mlp"] // 2 == 32
    assert rows["quantize"]["bytes"] < 0.5 * rows["redistill"]["bytes"]
    for stage in compress.STAGES:
        assert 0 <= rows[stage]["answer_acc"] <= 1
        assert rows[stage]["tasks_per_s"] > 0
    # The quantize stage's checkpoint (dequantized int8 weights) is the quantized model.
    records = read_metrics(os.path.join(workdir, "quantize", "metrics.jsonl"))
    logged = next(r for r in records if r["kind"] == "eval")
    run = rundir.load_run(os.path.join(workdir, "quantize"))
    eval_set = rundir.read_eval_set(os.path.join(workdir, "quantize", "eval_set.npz"), run.spec)
    dense = evaluate.evaluate(
        run.graphdef, run.params, eval_set, run.spec, batch_size=16, max_pred_tokens=12
    )
    assert dense["answer_acc"] == logged["answer_acc"]
    np.testing.assert_allclose(dense["loss"], logged["loss"], rtol=1e-5)
    # Stage 1 is word level: each logged window's loss is (1 - w) CE + w KL of its own terms.
    train_records = [
        r
        for r in read_metrics(os.path.join(workdir, "distill", "metrics.jsonl"))
        if r["kind"] == "train"
    ]
    assert train_records
    for r in train_records:
        np.testing.assert_allclose(r["loss"], 0.5 * r["ce"] + 0.5 * r["kl"], rtol=1e-5)
    # The report reads the stages as a sweep too.
    with open(os.path.join(workdir, "sweep.json")) as f:
        assert [m["dir"] for m in json.load(f)["members"]] == list(compress.STAGES)


def test_the_pipeline_resumes_after_a_kill_in_every_stage(
    teacher, uninterrupted, tmp_path, monkeypatch
):
    workdir = str(tmp_path / "killed")
    save, write_model_run = train._Member.save, compress.write_model_run

    def kill_in(stage):
        """Kills the run in `stage`: a distillation after its checkpoint of step 10, a
        one-shot stage once it has written its directory (before the rename), the report
        before it is written."""
        monkeypatch.undo()

        def save_then_die(member, step, state):
            save(member, step, state)
            if os.path.basename(member.workdir) == stage and step == 10:
                raise KilledError(stage)

        def write_then_die(out, *args, **kwargs):
            write_model_run(out, *args, **kwargs)
            if os.path.basename(out) == stage + compress.PARTIAL:
                raise KilledError(stage)

        def die(*args, **kwargs):
            raise KilledError(stage)

        monkeypatch.setattr(train._Member, "save", save_then_die)
        monkeypatch.setattr(compress, "write_model_run", write_then_die)
        if stage == "report":
            monkeypatch.setattr(compress, "time_decoding", die)

    for stage in (*compress.STAGES, "report"):
        kill_in(stage)
        with pytest.raises(KilledError):
            compress.run_pipeline(pipeline_config(teacher), workdir)
        if stage in ("prune", "quantize"):
            assert os.path.isdir(os.path.join(workdir, stage + compress.PARTIAL))
            assert not os.path.exists(os.path.join(workdir, stage))
    monkeypatch.undo()
    compress.run_pipeline(pipeline_config(teacher), workdir)
    assert not any(name.endswith(compress.PARTIAL) for name in os.listdir(workdir))
    assert stage_records(workdir) == stage_records(uninterrupted[0])


def test_a_relaunch_with_another_pipeline_config_is_refused(teacher, uninterrupted):
    config = pipeline_config(teacher)
    config.compress.mlp_keep = 0.25
    with pytest.raises(rundir.RunError, match="compress.mlp_keep"):
        compress.run_pipeline(config, uninterrupted[0])
    # Nor does a pipeline write into a run directory (here, one of its own stages).
    with pytest.raises(rundir.RunError, match="a directory of its own"):
        compress.run_pipeline(config, os.path.join(uninterrupted[0], "prune"))


def test_sweep_members_set_the_stages_fields(teacher):
    config = pipeline_config(teacher, "sweep")
    task, _ = compress.prepare(config)
    merged = compress._copy(config)
    merged.data, merged.seed = task.data, task.seed
    members = sweep.expand(merged)
    assert [m.config.compress.mlp_keep for m in members] == [0.5, 0.25]
    assert len({m.name for m in members}) == 2
    stages = compress.stage_configs(members[1].config, task)
    assert "compress" not in stages["distill"] and not stages["distill"].sweep.axes
    assert stages["redistill"].train.n_tasks == config.compress.redistill_tasks
    assert stages["redistill"].distill.on_policy_fraction == 0.5
    assert stages["distill"].distill.on_policy_fraction == 0.0


def test_report_rows_hold_shapes_accuracy_against_k_and_ratios_to_the_teacher():
    def abstract(**overrides):
        config = tiny_config(**overrides)
        return jax.eval_shape(functools.partial(model.init, config), jax.random.key(0))[1]

    big, small = abstract(), abstract(num_hidden_layers=1, intermediate_size=24)
    models = [
        compress.StageModel(
            "teacher", None, big, big, dict(answer_acc=0.8), dict(answer_acc_k1=0.5, loss_k1=2.0)
        ),
        compress.StageModel(
            "prune", None, small, small, dict(answer_acc=0.6), dict(answer_acc_k1=0.25)
        ),
    ]
    rows = compress.stage_rows(models, {"teacher": 40.0, "prune": 100.0})
    teacher, pruned = rows
    assert list(teacher) == list(pruned)  # one header
    assert (teacher["layers"], teacher["mlp"], teacher["heads"], teacher["kv_heads"]) == (
        2,
        64,
        4,
        2,
    )
    assert (pruned["layers"], pruned["mlp"], pruned["hidden"]) == (1, 24, 32)
    assert pruned["params"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(small))
    assert pruned["bytes"] == 4 * pruned["params"]  # float32
    assert pruned["acc_vs_teacher"] == pytest.approx(0.75)
    assert pruned["speed_vs_teacher"] == pytest.approx(2.5)
    assert (teacher["acc_k1"], pruned["acc_k1"]) == (0.5, 0.25)
    assert "loss_k1" not in teacher


# ---------------------------------------------------------------------------------------------
# A Hugging Face teacher.


def test_a_hugging_face_teacher_loads_with_its_task(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    task = load_config("tiny")
    hf_config = transformers.LlamaConfig(
        vocab_size=task.data.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)

    with pytest.raises(rundir.RunError, match="task_config"):
        distill.teacher_task(str(tmp_path / "hf"))
    teacher = distill.load_teacher(str(tmp_path / "hf"), task_config=task)
    assert teacher.config is task and teacher.spec.vocab_size == task.data.vocab_size
    rng = np.random.default_rng(1)
    ids = rng.integers(0, task.data.vocab_size, (3, 11)).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    mask[1, :4] = False
    positions = np.asarray(model.positions_from_mask(mask))
    ours = model.apply(teacher.graphdef, teacher.params, ids, positions, mask)
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(positions.astype(np.int64)),
        ).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours)[mask], theirs[mask], atol=1e-4)

    other = load_config("tiny")
    other.data.vocab_size = 48
    with pytest.raises(rundir.RunError, match="vocab_size"):
        distill.load_teacher(str(tmp_path / "hf"), task_config=other)


# ---------------------------------------------------------------------------------------------
# The command line.


def run_command(*args):
    return subprocess.run(
        [sys.executable, "-m", "cotlab_jax.compress", *args],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher=/no/such/teacher"], "teacher /no/such/teacher: no such directory"),
        (["--teacher=HF"], "give the task's config too (--task_config=configs/<file>.py)"),
        (["--teacher=HF", "--task_config=TASK", "--config.compress.mlp_keep=1.5"], "mlp_keep=1.5"),
        (["--teacher=HF", "--task_config=/no/such.py"], "/no/such.py"),
    ],
)
def test_bad_input_is_one_line(teacher, tmp_path, args, message):
    task = os.path.join(CONFIGS, "tiny.py")
    result = run_command(
        f"--config={os.path.join(CONFIGS, 'tiny_compress.py')}",
        f"--workdir={tmp_path / 'out'}",
        *(arg.replace("HF", teacher).replace("TASK", task) for arg in args),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out")


def test_main_refuses_a_pipeline_config(tmp_path):
    """`cotlab_jax.main` would train the student without its teacher: it points to the right
    command instead."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cotlab_jax.main",
            f"--config={os.path.join(CONFIGS, 'tiny_compress.py')}",
            f"--workdir={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "python -m cotlab_jax.compress" in result.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "out")
