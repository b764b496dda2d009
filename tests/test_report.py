"""The sweep report: table rows equal the runs' metrics, statuses, plots, single runs, the CLI."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from cotlab_jax import report
from cotlab_jax.metrics import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXES = [
    ["model.num_hidden_layers", [4, 8]],
    ["data.prompt_strategy", ["standard", "cot"]],
    ["data.vocab_size", [64, 256]],
]
TOTAL = 100  # n_tasks // batch_size
PNG = b"\x89PNG\r\n\x1a\n"
# member index -> (status, last step with metrics, has eval_by_k, analysis: None/"once"/"every")
PLAN = {
    0: ("finished", 100, True, "once"),
    1: ("finished", 100, False, None),
    2: ("finished", 100, True, "every"),
    3: ("finished", 100, False, None),
    4: ("running", 50, False, "every"),
    5: ("failed", 25, False, None),
    6: ("not started", None, False, None),
    7: ("not started", None, False, None),
}


def _u(rng, lo=0.0, hi=1.0) -> float:
    return float(rng.uniform(lo, hi))


def train_record(rng) -> dict:
    return dict(
        loss=_u(rng, 0.1, 4),
        n_cot=int(rng.integers(0, 64)),
        n_direct=int(rng.integers(0, 64)),
        grad_norm=_u(rng, 0, 5),
        tokens_per_s=_u(rng, 1e4, 1e6),
        step_time_s=_u(rng),
    )


def eval_record(rng, special=False) -> dict:
    values = dict(loss=_u(rng, 0.1, 4), answer_acc=_u(rng))
    if special:
        values.update(
            format_acc=_u(rng), **{f"gen_len_p{q}": _u(rng, 1, 30) for q in (25, 50, 75, 90, 99)}
        )
    else:
        values.update(answer_loss=_u(rng, 0.1, 4))
        for j in range(4):  # NaN (written as null) where no task reaches the index
            values[f"chain_acc_{j}"] = _u(rng) if j < 3 else math.nan
            values[f"chain_loss_{j}"] = _u(rng, 0.1, 4) if j < 3 else math.nan
    return values


def analysis_record(rng, coverage: bool) -> dict:
    values = {
        f"{name}_{side}_L{layer}H{head}": _u(rng)
        for name in ("parent_mass", "parent_top_m")
        for side in ("query", "demo")
        for layer in range(2)
        for head in range(4)
    }
    values["parent_mass_query_L1H3"] = math.nan  # a head without data
    values.update(
        parent_mass_query_best=_u(rng),
        parent_top_m_query_best=_u(rng),
        parent_mass_demo_best=_u(rng),
        embed_probe_r2=_u(rng),
        embed_cka=_u(rng),
    )
    if coverage:
        values["token_coverage"] = _u(rng)
    return values


def _text(path) -> str:
    with open(path) as f:
        return f.read()


def _json(path, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def write_run(
    path, rng, values, last_step, *, by_k=False, analysis=None, special=False, status="finished"
) -> None:
    """A fake run directory; its metrics go through the real MetricsWriter."""
    os.makedirs(path, exist_ok=True)
    config = {
        "seed": 0,
        "data": {"vocab_size": 64, "prompt_strategy": "cot"},
        "model": {"num_hidden_layers": 4},
        "train": {"n_tasks": 64 * TOTAL, "batch_size": 64},
        "eval": {},
    }
    for field, value in values.items():
        group, name = field.split(".")
        config[group][name] = value
    _json(os.path.join(path, "config.json"), config)
    writer = MetricsWriter(str(path), resume_step=0, tensorboard=False)
    if analysis == "once":
        writer.write(0, "analysis", {"token_coverage": _u(rng)})
    last = {}
    for step in range(25, last_step + 1, 25):
        last["train"] = train_record(rng)
        writer.write(step, "train", last["train"])
        last["eval"] = eval_record(rng, special)
        writer.write(step, "eval", last["eval"])
        if analysis:
            writer.write(step, "analysis", analysis_record(rng, coverage=analysis == "every"))
    if by_k:
        writer.write(
            last_step,
            "eval_by_k",
            {f"{m}_k{k}": _u(rng) for m in ("answer_acc", "loss") for k in (1, 2, 4, 8)},
        )
    writer.close()
    if status == "finished":
        _json(
            os.path.join(path, "results.json"),
            {
                "run_name": "fake",
                "step": last_step,
                "n_params": int(rng.integers(1e5, 1e6)),
                "train": last["train"],
                "eval": last["eval"],
            },
        )
    elif status == "failed":
        _json(
            os.path.join(path, "failed.json"),
            {"error": "non-finite loss\nTraceback ...", "step": last_step + 3},
        )


def write_sweep(root, seed=0) -> None:
    rng = np.random.default_rng(seed)
    members = []
    for index, (layers, prompt, vocab) in enumerate(
        (a, b, c) for a in AXES[0][1] for b in AXES[1][1] for c in AXES[2][1]
    ):
        values = {AXES[0][0]: layers, AXES[1][0]: prompt, AXES[2][0]: vocab}
        members.append({"index": index, "dir": f"members/{index:03d}", "values": values})
        status, last_step, by_k, analysis = PLAN[index]
        path = os.path.join(root, "members", f"{index:03d}")
        if status == "not started":
            if index == 6:
                os.makedirs(path)  # an empty dir; member 7 has none
            continue
        write_run(path, rng, values, last_step, by_k=by_k, analysis=analysis, status=status)
    _json(os.path.join(root, "sweep.json"), {"name": "vocab", "axes": AXES, "members": members})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sweep"))
    write_sweep(root)
    return root, report.write_report(root)


def expected_row(root, index) -> dict:
    """What the table must show, read straight from the member's metrics file."""
    path = os.path.join(root, "members", f"{index:03d}", "metrics.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f]

    def last(kind, name):
        hits = [r[name] for r in records if (kind is None or r["kind"] == kind) and name in r]
        return hits[-1] if hits else None

    results_path = os.path.join(os.path.dirname(path), "results.json")
    n_params = json.loads(_text(results_path))["n_params"] if os.path.exists(results_path) else None
    return dict(
        answer_acc=last("eval", "answer_acc"),
        eval_loss=last("eval", "loss"),
        chain_acc_0=last("eval", "chain_acc_0"),
        token_coverage=last(None, "token_coverage"),
        parent_mass=last("analysis", "parent_mass_query_best"),
        embed_probe_r2=last("analysis", "embed_probe_r2"),
        train_loss=last("train", "loss"),
        n_params=n_params,
    )


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def parse(cell: str):
    return None if cell == "" else float(cell)


def test_csv_rows_equal_last_metrics(sweep):
    root, out = sweep
    rows = read_csv(out["csv"])
    assert [int(r["member"]) for r in rows] == list(range(8))
    assert list(rows[0]) == [
        "member",
        "layers",
        "prompt",
        "vocab",
        "status",
        "step",
        "total_steps",
        "answer_acc",
        "eval_loss",
        "chain_acc_0",
        "token_coverage",
        "parent_mass",
        "embed_probe_r2",
        "train_loss",
        "n_params",
    ]  # format_acc: no member has it
    for row in rows:
        index = int(row["member"])
        expected = expected_row(root, index)
        for column, value in expected.items():
            assert parse(row[column]) == value, (index, column)
        assert row["status"] == PLAN[index][0]
        members = json.loads(_text(os.path.join(root, "sweep.json")))["members"]
        assert (int(row["layers"]), row["prompt"], int(row["vocab"])) == tuple(
            members[index]["values"].values()
        )
    assert rows[0]["answer_acc"] != "" and rows[4]["parent_mass"] != ""
    assert rows[0]["token_coverage"] != "" and rows[2]["token_coverage"] != ""
    assert [(r["step"], r["total_steps"]) for r in rows] == [("100", "100")] * 4 + [
        ("50", "100"),
        ("28", "100"),
        ("0", ""),
        ("0", ""),
    ]


def test_rows_as_data(sweep):
    root, out = sweep
    rows = report.table_rows(root)
    assert rows == out["rows"]
    for row in rows:
        for column, value in expected_row(root, row["member"]).items():
            assert row[column] == value
    assert [r["status"] for r in rows] == [PLAN[i][0] for i in range(8)]


def test_markdown_table(sweep):
    root, out = sweep
    text = _text(out["markdown"])
    assert out["table"] in text and "## Failed" in text and "non-finite loss" in text
    lines = [line for line in out["table"].splitlines() if not line.startswith("|-")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line, row in zip(lines[1:], out["rows"], strict=True):
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for column, value in row.items():
            shown = (
                ""
                if value is None
                else (f"{value:.4g}" if isinstance(value, float) else str(value))
            )
            assert cells[column] == shown, (row["member"], column)


def assert_png(path) -> None:
    with open(path, "rb") as f:
        content = f.read()
    assert content.startswith(PNG) and len(content) > 5000, path


def test_plots(sweep):
    root, out = sweep
    expected = {
        "accuracy_vs_steps",
        "final_accuracy",
        "accuracy_vs_k",
        "analysis_over_steps",
        "dag_heatmap_0",
        "dag_heatmap_2",
        "dag_heatmap_4",
    }
    assert set(out["plots"]) == expected
    for name, path in out["plots"].items():
        assert path == os.path.join(f"{root}_report", name + ".png")  # beside the sweep
        assert_png(path)
    assert sorted(os.listdir(f"{root}_report")) == sorted(
        [n + ".png" for n in expected] + ["summary.csv", "summary.md"]
    )


def test_single_run(tmp_path):
    rng = np.random.default_rng(1)
    run = tmp_path / "run"
    write_run(
        str(run),
        rng,
        {"data.prompt_strategy": "cot_special_token"},
        75,
        by_k=True,
        special=True,
        status="running",
    )
    out = report.write_report(str(run), str(tmp_path / "out"))
    (row,) = read_csv(out["csv"])
    assert list(row) == [
        "member",
        "status",
        "step",
        "total_steps",
        "answer_acc",
        "eval_loss",
        "format_acc",
        "train_loss",
        "n_params",
    ]
    records = [json.loads(line) for line in _text(run / "metrics.jsonl").splitlines()]
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert (row["status"], row["step"]) == ("running", "75")
    assert parse(row["answer_acc"]) == last_eval["answer_acc"]
    assert parse(row["format_acc"]) == last_eval["format_acc"]
    assert set(out["plots"]) == {"accuracy_vs_steps", "final_accuracy", "accuracy_vs_k"}
    for path in out["plots"].values():
        assert_png(path)


def test_sweep_without_data(tmp_path):
    members = [
        {"index": i, "dir": f"m{i}", "values": {"data.vocab_size": v}}
        for i, v in enumerate([64, 128])
    ]
    _json(
        tmp_path / "sweep.json",
        {"name": "empty", "axes": [["data.vocab_size", [64, 128]]], "members": members},
    )
    out = report.write_report(str(tmp_path))
    assert [r["status"] for r in out["rows"]] == ["not started"] * 2
    assert set(out["plots"]) == {"accuracy_vs_steps", "final_accuracy"}


def test_missing_dir_error(tmp_path, capsys):
    """What the command does with a directory holding no sweep and no run (`main` runs `run`)."""
    with pytest.raises(report.ReportError, match="neither a sweep"):
        report.write_report(str(tmp_path / "nothing"))
    assert report.run(str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cotlab_jax.report", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


def test_cli(sweep, tmp_path):
    """The real command (one subprocess: importing cotlab_jax.metrics takes seconds)."""
    root, out = sweep
    result = cli(f"--workdir={root}", f"--out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert out["table"] in result.stdout and f"Report written to {tmp_path}" in result.stdout
    assert _text(tmp_path / "summary.csv") == _text(out["csv"])


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


def test_the_command_writes_beside_a_sweep_and_its_members_never_in_them(tmp_path, capsys):
    root = tmp_path / "vocab"
    write_sweep(str(root))
    before = _snapshot(root)
    assert report.run(str(root)) == 0
    assert f"Report written to {root}_report " in capsys.readouterr().out
    assert os.path.exists(f"{root}_report/summary.csv")
    member = root / "members" / "000"
    assert report.run(str(member)) == 0
    assert os.path.exists(f"{root}_report/members/000/summary.csv")
    for inside in (root / "report", member / "plots"):
        with pytest.raises(SystemExit, match="is a run directory, which this command never"):
            report.run(str(member), str(inside))
    assert _snapshot(root) == before
