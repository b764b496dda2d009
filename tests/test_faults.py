"""Faults injected for real into copies of one tiny trained run: damaged metrics, checkpoints,
eval sets and configs, a second writer, a reader beside a save in progress, a changed relaunch,
export targets, a full disk, and bad command-line input. Each command must end in one line."""

import errno
import filecmp
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from cotlab_jax import cli_errors, export, metrics, report, rundir, runlock, symbolic, train
from cotlab_jax.evaluate import cli as evaluate_cli
from cotlab_jax.metrics import MetricsWriter, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.py")
TIMING = ("tokens_per_s", "step_time_s")
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_faults", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def command(module, *flags):
    return subprocess.run(
        [sys.executable, "-m", module, *flags],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def records(workdir):
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in read_metrics(os.path.join(workdir, "metrics.jsonl"), warn=False)
    ]


def one_line_error(result, *fragments):
    """The command failed with exactly one line on stderr, holding every fragment."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One finished run of the main command (checkpoints 20, 30, 40); tests damage copies."""
    workdir = str(tmp_path_factory.mktemp("faults") / "run")
    train.train_and_evaluate(tiny_config(), workdir)  # in this process: relaunches compare exactly
    return workdir


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(trained_run, copy)
    return copy


def largest_file(directory):
    files = [os.path.join(d, name) for d, _, names in os.walk(directory) for name in names]
    return max(files, key=os.path.getsize)


def garble_line(path, number, text='{"step": 1, "kind": "tra'):
    with open(path) as f:
        lines = f.readlines()
    lines[number - 1] = text + "\n"
    with open(path, "w") as f:
        f.writelines(lines)


# 1. metrics.jsonl


def test_bad_metrics_lines_are_skipped_and_reported_never_later_rows(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "kind": "train", "loss": 1.0 / (s + 1)} for s in range(0, 50, 5)]
    lines = [json.dumps(r) + "\n" for r in rows]
    lines[2] = "\x00\x17garbage{\n"  # a garbled line in the middle
    path.write_text("".join(lines) + '{"step": 50, "kind": "tr')  # and a torn last line
    kept = read_metrics(str(path))
    assert kept == rows[:2] + rows[3:]
    assert "skipped unreadable line(s) 3, 11" in capsys.readouterr().err
    # A resume from step 30 keeps every readable row up to it, those after the bad line too.
    MetricsWriter(str(tmp_path), 30, tensorboard=False).close()
    assert read_metrics(str(path)) == [r for r in rows[:2] + rows[3:] if r["step"] <= 30]


def test_relaunch_after_a_damaged_checkpoint_and_metrics_line_ends_as_uninterrupted(
    trained_run, run_copy, capfd
):
    """A garbled metrics line and a truncated latest checkpoint: the relaunch falls back to
    checkpoint 30, recomputes 31-40 and ends with the uninterrupted run's records and results."""
    metrics_path = os.path.join(run_copy, "metrics.jsonl")
    with open(metrics_path) as f:
        line = 1 + [json.loads(x)["step"] for x in f].index(10)  # the step-10 train record
    garble_line(metrics_path, line)
    checkpoint = os.path.join(run_copy, "checkpoints", "40")
    for directory, _, names in os.walk(checkpoint):  # every array data file, cut to a third
        for name in names:
            if os.path.basename(directory) == "d":
                path = os.path.join(directory, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
    os.remove(os.path.join(run_copy, "results.json"))
    train.train_and_evaluate(tiny_config(), run_copy)
    err = capfd.readouterr().err
    assert f"skipped unreadable line(s) {line} " in err, err
    assert "checkpoint step 40" in err and "steps 31-40 are recomputed" in err, err
    expected = [r for r in records(trained_run) if not (r["step"] == 10 and r["kind"] == "train")]
    assert records(run_copy) == expected, err
    with (
        open(os.path.join(trained_run, "results.json")) as f,
        open(os.path.join(run_copy, "results.json")) as g,
    ):
        assert json.load(g)["eval"] == json.load(f)["eval"]
    assert rundir.load_run(run_copy).step == 40  # the recomputed checkpoint is whole
    assert os.listdir(os.path.join(run_copy, rundir.DAMAGED_DIR))
    assert report.load_sweep(run_copy).members[0].status == "finished"


# 2. two writers


def test_a_second_process_refuses_and_a_dead_ones_lock_is_taken_over(run_copy):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom cotlab_jax import runlock\n"
            f"runlock.RunLock({run_copy!r}).acquire(); print('held', flush=True); time.sleep(300)",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        config_before = os.path.getmtime(os.path.join(run_copy, "config.json"))
        result = command("cotlab_jax.main", f"--config={TINY}", f"--workdir={run_copy}")
        one_line_error(result, f"host {socket.gethostname()}", f"pid {holder.pid}")
        assert os.path.getmtime(os.path.join(run_copy, "config.json")) == config_before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_path = os.path.join(run_copy, runlock.LOCK_NAME)
    assert os.path.exists(lock_path)  # left by the killed holder: stale
    with runlock.RunLock(run_copy), open(lock_path) as f:
        assert json.load(f)["pid"] == os.getpid()
    assert not os.path.exists(lock_path)
    with open(lock_path, "w") as f:
        json.dump(dict(host="another-host", pid=os.getpid(), started="then"), f)
    with pytest.raises(runlock.LockedError, match=f"another host .*delete {lock_path}"):
        runlock.RunLock(run_copy).acquire()


# 3. readers beside a save in progress


def test_readers_never_touch_a_save_in_progress(run_copy, tmp_path):
    checkpoints = os.path.join(run_copy, "checkpoints")
    in_progress = os.path.join(checkpoints, "50.orbax-checkpoint-tmp-1795650000000000")
    shutil.copytree(os.path.join(checkpoints, "40"), in_progress)
    os.remove(os.path.join(in_progress, "commit_success.txt"))
    assert rundir.latest_checkpoint(run_copy) == 40
    assert rundir.load_run(run_copy).step == 40
    export.export_run(run_copy, str(tmp_path / "hf"))
    result = evaluate_cli.run_cli(run_copy, "latest")
    assert result["step"] == 40
    assert os.path.isdir(in_progress)
    assert not filecmp.dircmp(os.path.join(checkpoints, "40"), in_progress).diff_files


def _snapshot(directory) -> dict:
    """Every file (its bytes) and directory under `directory`, by relative path."""
    tree = {}
    for where, dirs, names in os.walk(directory):
        for name in dirs:
            tree[os.path.relpath(os.path.join(where, name), directory)] = "dir"
        for name in names:
            path = os.path.join(where, name)
            with open(path, "rb") as f:
                tree[os.path.relpath(path, directory)] = f.read()
    return tree


def test_evaluate_export_and_report_leave_the_run_byte_identical(run_copy, tmp_path, capsys):
    before = _snapshot(run_copy)
    assert evaluate_cli.run_cli(run_copy, "latest")["step"] == 40
    export.export_run(run_copy, str(tmp_path / "hf"))
    assert report.run(run_copy) == 0  # by default beside the run
    assert f"Report written to {run_copy}_report " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="is a run directory, which this command never"):
        report.run(run_copy, os.path.join(run_copy, "report"))
    assert _snapshot(run_copy) == before


def test_evaluate_on_a_run_without_checkpoints_writes_nothing(run_copy):
    shutil.rmtree(os.path.join(run_copy, "checkpoints"))
    with pytest.raises(SystemExit, match="has no checkpoint"):
        evaluate_cli.run_cli(run_copy, "latest")
    assert not os.path.exists(os.path.join(run_copy, "checkpoints"))


# 4. relaunch with another config


def test_relaunch_with_changed_numbers_is_refused_unless_allowed(run_copy):
    path = os.path.join(run_copy, "config.json")
    with open(path) as f:
        saved = f.read()
    changed = tiny_config()
    changed.train.lr, changed.seed = 0.5, 7
    with pytest.raises(
        rundir.RunError,
        match=r"changed fields: seed \(42 -> 7\), train\.lr "
        r"\(0\.003 -> 0\.5\).*--allow_config_change",
    ):
        rundir.prepare_workdir(run_copy, changed)
    with open(path) as f:
        assert f.read() == saved
    harmless = tiny_config()
    harmless.eval.eval_every_n_steps, harmless.train.log_every_n_steps = 10, 10
    harmless.log.tensorboard = False
    rundir.prepare_workdir(run_copy, harmless)
    rundir.prepare_workdir(run_copy, changed, allow_config_change=True)
    assert rundir.load_config(run_copy).train.lr == 0.5


# 5. export targets


def test_export_never_writes_into_a_run_or_a_non_empty_directory(run_copy, tmp_path):
    config_json = os.path.join(run_copy, "config.json")
    with open(config_json) as f:
        saved = f.read()
    for out in (run_copy, os.path.join(run_copy, "hf")):
        with pytest.raises(SystemExit, match="is a run directory"):
            export.export_run(run_copy, out)
    with open(config_json) as f:
        assert f.read() == saved
    assert not os.path.exists(os.path.join(run_copy, "hf"))
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="non-empty directory.*--overwrite"):
        export.export_run(run_copy, str(target))
    assert export.export_run(run_copy, str(target), overwrite=True) == 40
    assert (target / "notes.txt").read_text() == "mine"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot write there"):
        export.export_run(run_copy, str(blocker / "hf"))


# 7. a full disk


class _FullDisk:
    """A file that takes `budget` more characters, then writes part of the next line and fails
    as a full disk does."""

    def __init__(self, file, budget):
        self.file, self.budget = file, budget

    def write(self, text):
        if len(text) > self.budget:
            self.file.write(text[: self.budget])
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(text)
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_metrics_disk_stops_writing_and_keeps_every_row(tmp_path, monkeypatch):
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return _FullDisk(file, 200) if mode == "a" else file

    writer = MetricsWriter(str(tmp_path), 0, tensorboard=False)
    rows = [dict(loss=0.5 + step, note="x" * 100) for step in range(3)]
    for step, row in enumerate(rows):
        writer.write(step, "train", row)
    writer.close()
    monkeypatch.setattr(metrics, "open", full_disk_open, raising=False)
    writer = MetricsWriter(str(tmp_path), 2, tensorboard=False)
    writer.write(3, "train", rows[0])  # fits
    with pytest.raises(metrics.MetricsWriteError, match="metrics.jsonl: the disk is full"):
        writer.write(4, "train", rows[0])  # half of it fits
    writer.close()
    kept = read_metrics(str(tmp_path / "metrics.jsonl"), warn=False)
    assert [r["step"] for r in kept] == [0, 1, 2, 3]


def test_a_full_disk_at_a_checkpoint_stops_cleanly_and_the_relaunch_goes_on_exactly(
    trained_run, run_copy, monkeypatch
):
    shutil.rmtree(os.path.join(run_copy, "checkpoints", "40"))
    os.remove(os.path.join(run_copy, "results.json"))
    config = tiny_config()

    def full_disk_save(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(ocp.CheckpointManager, "save", full_disk_save)
        with pytest.raises(
            train.WriteFailedError,
            match="checkpoint .* at step 40 failed: the disk is full.* up to checkpoint 30",
        ):
            train.train_and_evaluate(config, run_copy)
    assert rundir.latest_checkpoint(run_copy) == 30
    assert rundir.load_run(run_copy).step == 30
    assert records(run_copy) == records(trained_run)  # the rows of 31-40 were written first
    train.train_and_evaluate(config, run_copy)
    assert records(run_copy) == records(trained_run)


# 8. bad input: one line, nothing written


def test_damaged_run_files_give_one_line_naming_the_file(run_copy, tmp_path, capsys):
    eval_set = os.path.join(run_copy, "eval_set.npz")
    shutil.copy(eval_set, tmp_path / "eval_set.npz")
    with open(eval_set, "r+b") as f:
        f.truncate(os.path.getsize(eval_set) // 2)
    with pytest.raises(SystemExit, match=r"eval_set\.npz is damaged") as raised:
        evaluate_cli.run_cli(run_copy, "latest")
    assert "task config changed" not in str(raised.value)
    shutil.copy(tmp_path / "eval_set.npz", eval_set)

    for missing in (tmp_path / "nowhere", tmp_path / "eval_set.npz"):
        with pytest.raises(SystemExit, match="--eval_dataset=.*no such directory"):
            evaluate_cli.run_cli(run_copy, "latest", eval_dataset=str(missing))
    with pytest.raises(SystemExit, match="--out=.* is a directory"):
        evaluate_cli.run_cli(run_copy, "latest", out=str(tmp_path))

    checkpoint_file = largest_file(os.path.join(run_copy, "checkpoints", "40"))
    with open(checkpoint_file, "r+b") as f:
        f.truncate(10)
    with pytest.raises(SystemExit, match="checkpoint step 40 .* is damaged"):
        evaluate_cli.run_cli(run_copy, "latest")

    results = os.path.join(run_copy, "results.json")
    with open(results, "w") as f:
        f.write("{garbage")
    member = report.load_sweep(run_copy).members[0]
    assert member.status == "damaged results.json"
    assert "results.json is unreadable" in capsys.readouterr().err

    with open(os.path.join(run_copy, "config.json"), "w") as f:
        f.write("[1, 2")
    with pytest.raises(SystemExit, match=r"config\.json is damaged"):
        export.export_run(run_copy, str(tmp_path / "hf"))


def test_commands_answer_bad_input_in_one_line(run_copy, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    one_line_error(
        command(
            "cotlab_jax.main", f"--config={TINY}", f"--workdir={run_copy}", "--config.train.lr=0.5"
        ),
        "train.lr (0.003 -> 0.5)",
    )
    assert report.run(run_copy, str(blocker / "report")) == 1
    assert "cannot write the report" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot write there"):
        cli_errors.check_writable_dir("--out_dir", str(blocker / "chats"))
    with pytest.raises(IsADirectoryError):  # the symbolic command's writer: no .tmp left
        symbolic.write_jsonl(str(tmp_path), [])
    assert not list(tmp_path.parent.glob("*.tmp"))


def test_evaluate_keeps_library_logs_off_the_terminal(run_copy, tmp_path):
    result = command(
        "cotlab_jax.evaluate", f"--workdir={run_copy}", f"--out={tmp_path / 'result.json'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip() == "", result.stderr[-3000:]


def test_more_commands_answer_bad_input_in_one_line(run_copy, tmp_path):
    """Found by probing: a sweep whose workdir is a file, evaluate --out into the run, prune
    --out into the run or under a file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    sweep_config = os.path.join(ROOT, "tests", "configs", "tiny_sweep.py")
    one_line_error(
        command("cotlab_jax.main", f"--config={sweep_config}", f"--workdir={blocker}"),
        f"cannot write to workdir {blocker}",
    )
    inside = os.path.join(run_copy, "result.json")
    with pytest.raises(SystemExit, match="is a run directory, which this command never"):
        evaluate_cli.run_cli(run_copy, "latest", out=inside)
    assert not os.path.exists(inside)
    for out, fragment in (
        (os.path.join(run_copy, "pruned"), "is a run directory"),
        (str(blocker / "pruned"), "cannot write there"),
    ):
        one_line_error(
            command("cotlab_jax.prune", f"--workdir={run_copy}", f"--out={out}"), fragment
        )
    assert not os.path.exists(os.path.join(run_copy, "pruned"))


@pytest.mark.parametrize(
    "module, flags, fragment",
    [
        ("cotlab_jax.main", [], "--config=configs/<file>.py is required"),
        ("cotlab_jax.report", [], "--workdir is required"),
        ("cotlab_jax.report", ["--workdir=x", "extra"], "unexpected arguments"),
        ("cotlab_jax.distill", [], "--config is required"),
    ],
)
def test_missing_or_unexpected_arguments_are_one_line(module, flags, fragment):
    """Not absl's usage text (the module's docstring) before the message."""
    one_line_error(command(module, *flags), fragment, "--help lists the flags")


@pytest.mark.parametrize("flag", ["--batch_size=0", "--repeats=-3", "--batch_size=many"])
def test_benchmark_counts_must_be_positive(flag):
    """An empty or zero-division table is not a measurement: argparse's one usage error."""
    result = command("cotlab_jax.bench", "sampler", flag)
    assert result.returncode == 2
    assert "expected a positive integer" in result.stderr
    assert "Traceback" not in result.stderr
