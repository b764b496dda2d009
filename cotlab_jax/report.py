"""`python -m cotlab_jax.report --workdir=DIR [--out_dir=OUT]`: a sweep's table and plots.

DIR holds `sweep.json` (axes and members, each member a run directory) or is a single run
(`config.json` + `metrics.jsonl`, reported as a one-member sweep with no axes). The command
writes beside DIR, never into it (a run may be training there): to `DIR_report/` (for a sweep's
member, `SWEEP_report/<member dir>/`), or to OUT, which must lie outside every run directory. A
sweep's trainer writes its own final report into `DIR/report/`. The report: `summary.md` and
`summary.csv` (one row per member: its swept values,
status, steps, the last eval record's metrics, analysis metrics, train loss, parameters) and PNG
plots: `accuracy_vs_steps.png`, `final_accuracy.png`, and where the runs logged them
`accuracy_vs_k.png`, `analysis_over_steps.png` and `dag_heatmap_<member>.png`.
"""

import csv
import dataclasses
import json
import math
import os
import re
import sys

from absl import app, flags
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from cotlab_jax import analysis, cli_errors
from cotlab_jax.metrics import read_metrics

DEPTH = "model.num_hidden_layers"
PROMPT = "data.prompt_strategy"
VOCAB = "data.vocab_size"
SHORT_NAMES = {
    DEPTH: "layers",
    PROMPT: "prompt",
    VOCAB: "vocab",
    "data.n_dims": "dims",
    "data.n_input_choices": "N",
    "data.n_parent_choices": "M",
    "data.chain_length_choices": "C",
    "data.n_example_choices": "K",
    "data.activation": "act",
    "data.num_unique_H": "uH",
    "data.H_num_layers": "H_layers",
    "data.cot_example_prob_recipe_info": "alpha",
    "data.cot_example_prob_recipe_info.alpha": "alpha",
    "model.hidden_size": "hidden",
    "train.n_tasks": "tasks",
    "train.batch_size": "batch",
    "train.lr": "lr",
}
# (column, record kind, metric) of the table's metric columns, after status and steps.
METRIC_COLUMNS = (
    ("answer_acc", "eval", "answer_acc"),
    ("eval_loss", "eval", "loss"),
    ("chain_acc_0", "eval", "chain_acc_0"),
    ("format_acc", "eval", "format_acc"),
    ("token_coverage", None, "token_coverage"),
    ("parent_mass", "analysis", "parent_mass_query_best"),
    ("embed_probe_r2", "analysis", "embed_probe_r2"),
    ("train_loss", "train", "loss"),
)
# Dropped from the table when no member has a value.
OPTIONAL_COLUMNS = ("chain_acc_0", "format_acc", "token_coverage", "parent_mass", "embed_probe_r2")
ANALYSIS_CURVES = ("parent_mass_query_best", "embed_probe_r2", "embed_cka")


class ReportError(ValueError):
    """The directory holds no sweep and no run."""


@dataclasses.dataclass
class Member:
    """One run of a sweep, as read from its directory."""

    index: int
    dir: str
    values: dict
    config: dict | None
    records: list[dict]
    results: dict | None
    failed: dict | None
    damaged: tuple[str, ...] = ()  # files that exist but cannot be read

    @property
    def status(self) -> str:
        if self.results is not None:
            return "finished"
        if self.failed is not None:
            return "failed"
        if self.damaged:
            return "damaged " + "+".join(self.damaged)
        return "running" if self.records or self.config is not None else "not started"

    @property
    def step(self) -> int:
        steps = [r.get("step", 0) for r in self.records]
        steps += [d.get("step") or 0 for d in (self.results, self.failed) if d]
        return max(steps, default=0)

    @property
    def total_steps(self) -> int | None:
        try:
            return self.config["train"]["n_tasks"] // self.config["train"]["batch_size"]
        except (KeyError, TypeError, ZeroDivisionError):
            return None

    @property
    def prompt_strategy(self) -> str | None:
        if PROMPT in self.values:
            return self.values[PROMPT]
        return ((self.config or {}).get("data") or {}).get("prompt_strategy")

    def kind(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]

    def last(self, kind: str | None, name: str):
        """`name` in the last record of `kind` (any kind if None) that has it, else None."""
        for record in reversed(self.records):
            if (kind is None or record.get("kind") == kind) and name in record:
                return record[name]
        return None


@dataclasses.dataclass
class Sweep:
    name: str
    axes: list[tuple[str, list]]
    members: list[Member]


def _read_json(path: str):
    """The JSON object in `path`, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _load_member(index: int, path: str | None, values: dict) -> Member:
    if path is None:  # listed without a directory: not started
        return Member(index, "", values, None, [], None, None)
    files = {name: os.path.join(path, name + ".json") for name in ("config", "results", "failed")}
    read = {name: _read_json(file) for name, file in files.items()}
    damaged = tuple(
        name + ".json"
        for name, file in files.items()
        if read[name] is None and os.path.exists(file)
    )
    for name in damaged:
        print(
            f"warning: {os.path.join(path, name)} is unreadable; the member is shown as damaged",
            file=sys.stderr,
        )
    return Member(
        index=index,
        dir=path,
        values=values,
        config=read["config"],
        records=read_metrics(os.path.join(path, "metrics.jsonl")),
        results=read["results"],
        failed=read["failed"],
        damaged=damaged,
    )


def load_sweep(workdir: str) -> Sweep:
    """The sweep in `workdir`, or a single run there as a one-member sweep."""
    spec_path = os.path.join(workdir, "sweep.json")
    if os.path.exists(spec_path):
        spec = _read_json(spec_path)
        if not isinstance(spec, dict):
            raise ReportError(f"{spec_path} is not a readable sweep description")
        axes = [(field, list(values)) for field, values in spec.get("axes", [])]
        members = [
            _load_member(
                m.get("index", i),
                os.path.join(workdir, m["dir"]) if m.get("dir") else None,
                m.get("values") or {},
            )
            for i, m in enumerate(spec.get("members", []))
        ]
        return Sweep(spec.get("name") or os.path.basename(os.path.abspath(workdir)), axes, members)
    if os.path.exists(os.path.join(workdir, "config.json")):
        name = os.path.basename(os.path.abspath(workdir))
        return Sweep(name, [], [_load_member(0, workdir, {})])
    raise ReportError(f"{workdir} holds neither a sweep (sweep.json) nor a run (config.json)")


def short_names(axes) -> dict[str, str]:
    """Column names for the swept fields: SHORT_NAMES or the last component, full if clashing."""
    short = {field: SHORT_NAMES.get(field, field.rsplit(".", 1)[-1]) for field, _ in axes}
    taken = {
        "member",
        "status",
        "step",
        "total_steps",
        "n_params",
        *(column for column, _, _ in METRIC_COLUMNS),
    }
    counts = {}
    for name in short.values():
        counts[name] = counts.get(name, 0) + 1
    return {
        field: field if counts[name] > 1 or name in taken else name for field, name in short.items()
    }


def show_value(value) -> str:
    """A swept value as a short string: lists joined by '-', a recipe by its alpha."""
    if isinstance(value, (list, tuple)):
        return "-".join(show_value(v) for v in value)
    if isinstance(value, dict):
        return show_value(value["alpha"]) if "alpha" in value else json.dumps(value)
    return "none" if value is None else str(value)


def _rows(sweep: Sweep) -> list[dict]:
    names = short_names(sweep.axes)
    rows = []
    for m in sweep.members:
        row = {"member": m.index}
        row.update({names[field]: m.values.get(field) for field, _ in sweep.axes})
        row.update(status=m.status, step=m.step, total_steps=m.total_steps)
        row.update({column: m.last(kind, name) for column, kind, name in METRIC_COLUMNS})
        row["n_params"] = (m.results or {}).get("n_params")
        rows.append(row)
    empty = [c for c in OPTIONAL_COLUMNS if all(row[c] is None for row in rows)]
    return [{k: v for k, v in row.items() if k not in empty} for row in rows]


def table_rows(workdir: str) -> list[dict]:
    """The summary table as data: one dict per member, the same keys in every row.

    Metric values are the runs' own (the last record of their kind that has them; None where a
    run has none); swept values are as in sweep.json.
    """
    return _rows(load_sweep(workdir))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return show_value(value) if isinstance(value, (list, tuple, dict)) else str(value)


def _csv_cell(value) -> str:
    """Exact: floats as repr, so the CSV parses back to the metrics' values."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else _cell(value)


def markdown_table(rows: list[dict]) -> str:
    """An aligned Markdown table (also what the terminal shows); floats to 4 digits."""
    if not rows:
        return "(no members)"
    header = list(rows[0])
    cells = [[_cell(row[k]).replace("|", "\\|") for k in header] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    numeric = [all(_num(row[k]) is not None for row in rows if row[k] is not None) for k in header]

    def line(values):
        padded = (
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if right else (":" + "-" * (w + 1))
            for w, right in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(c) for c in cells)])


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if rows:
            writer.writerow(list(rows[0]))
            writer.writerows([_csv_cell(v) for v in row.values()] for row in rows)


def _first_line(failed: dict) -> str:
    return (str(failed.get("error") or "").strip().splitlines() or [""])[0]


def _markdown(sweep: Sweep, table: str, plots: dict[str, str]) -> str:
    lines = [f"# Sweep `{sweep.name}`", ""]
    for field, values in sweep.axes:
        lines.append(f"- `{field}`: {', '.join(show_value(v) for v in values)}")
    lines += ["", table, ""]
    failed = [m for m in sweep.members if m.status == "failed"]
    if failed:
        lines += ["## Failed", ""]
        lines += [
            f"- member {m.index} at step {m.failed.get('step')}: {_first_line(m.failed)}"
            for m in failed
        ]
        lines.append("")
    for name in plots:
        lines += [f"![{name}]({name}.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _num(value) -> float | None:
    """A finite float, or None (null, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _curve(records: list[dict], name: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], _num(r.get(name))) for r in records]
    points = [(s, v) for s, v in points if v is not None]
    return [s for s, _ in points], [v for _, v in points]


def _figure(n_rows: int = 1, n_cols: int = 1, width: float = 5.0, height: float = 4.0):
    """An Agg figure (no pyplot state) and its axes grid."""
    fig = Figure(figsize=(width * n_cols, height * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(n_rows, n_cols, squeeze=False)


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=100)
    fig.clear()
    return path


def _colors(n: int) -> list:
    cmap = colormaps["viridis"] if n > 10 else colormaps["tab10"]
    return [cmap(i / max(n - 1, 1) * 0.9) if n > 10 else cmap(i) for i in range(n)]


def _style(strategy) -> str:
    """Dashed for the `standard*` strategies, solid for the CoT ones (and unknown)."""
    return "--" if isinstance(strategy, str) and strategy.startswith("standard") else "-"


def _other_axes(sweep: Sweep) -> list[tuple[str, list]]:
    return [(f, v) for f, v in sweep.axes if f not in (DEPTH, PROMPT)]


def _axis_order(axis_values: list, value) -> int:
    return next((i for i, v in enumerate(axis_values) if v == value), len(axis_values))


def _label(sweep: Sweep, m: Member, fields) -> str:
    names = short_names(sweep.axes)
    return (
        ", ".join(f"{names[f]}={show_value(m.values.get(f))}" for f in fields)
        or f"member {m.index}"
    )


def _member_label(sweep: Sweep, m: Member) -> str:
    fields = [f for f, _ in sweep.axes]
    return f"{m.index}: {_label(sweep, m, fields)}" if fields else f"member {m.index}"


def _group_key(m: Member, axes) -> tuple:
    return tuple(_axis_order(values, m.values.get(field)) for field, values in axes)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


@dataclasses.dataclass
class _Scheme:
    """How the per-member line plots draw a sweep: a column per depth, color by the swept
    values other than depth and prompt (by prompt if none), solid CoT, dashed standard."""

    depths: list
    color: dict[int, tuple]  # member index -> color
    legend: list  # proxy artists


def _scheme(sweep: Sweep) -> _Scheme:
    axes = dict(sweep.axes)
    fields = [f for f, _ in _other_axes(sweep)] or ([PROMPT] if PROMPT in axes else [])
    color_axes = [(f, axes[f]) for f in fields]
    first = {}
    for m in sweep.members:
        first.setdefault(_group_key(m, color_axes), m)
    keys = sorted(first)
    by_key = dict(zip(keys, _colors(len(keys)), strict=True))
    legend = [
        Line2D([], [], color=by_key[k], marker=".", label=_label(sweep, first[k], fields))
        for k in keys
    ]
    styles = {_style(m.prompt_strategy) for m in sweep.members}
    if len(styles) > 1:
        legend += [
            Line2D([], [], color="black", linestyle="-", label="CoT"),
            Line2D([], [], color="black", linestyle="--", label="standard"),
        ]
    return _Scheme(
        depths=axes.get(DEPTH, [None]),
        legend=legend,
        color={m.index: by_key[_group_key(m, color_axes)] for m in sweep.members},
    )


def _depth_grid(
    sweep: Sweep, path: str, rows, xlabel: str, ylim=None, always: bool = False
) -> str | None:
    """Line plots per member: a row per (title, member -> (x, y)), a column per depth.

    Unless `always`, None (and nothing written) when no member has data for any row.
    """
    curves = [[(m, fn(m)) for m in sweep.members] for _, fn in rows]
    curves = [[(m, xy) for m, xy in row if xy[0]] for row in curves]
    if not always and not any(curves):
        return None
    scheme = _scheme(sweep)
    fig, axes = _figure(len(rows), len(scheme.depths), height=3.6)
    for (title, _), row_curves, row_axes in zip(rows, curves, axes, strict=True):
        for depth, ax in zip(scheme.depths, row_axes, strict=True):
            drawn = [
                (m, xy) for m, xy in row_curves if depth is None or m.values.get(DEPTH) == depth
            ]
            for m, (x, y) in drawn:
                ax.plot(x, y, _style(m.prompt_strategy), marker=".", color=scheme.color[m.index])
            ax.set_title(
                title if depth is None else f"{title}, layers = {depth}", fontsize="medium"
            )
            ax.set_xlabel(xlabel)
            if ylim is not None:
                ax.set_ylim(*ylim)
            if not drawn:
                _no_data(ax, "no data yet")
    fig.suptitle(sweep.name)
    fig.legend(handles=scheme.legend, loc="outside right upper", fontsize="small")
    return _save(fig, path)


def plot_accuracy_vs_steps(sweep: Sweep, path: str) -> str:
    """Eval answer_acc against step: a panel per depth, color by the other swept values."""
    return _depth_grid(
        sweep,
        path,
        [("eval answer accuracy", lambda m: _curve(m.kind("eval"), "answer_acc"))],
        xlabel="step",
        ylim=(-0.02, 1.02),
        always=True,
    )


def _x_positions(field: str, axis_values: list):
    """(x of each axis value, tick labels, numeric?) for the swept parameter."""
    scalars = [v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v for v in axis_values]
    numeric = all(_num(v) is not None for v in scalars) and (
        field != VOCAB or all(v > 0 for v in scalars)
    )
    xs = [float(v) for v in scalars] if numeric else list(range(len(axis_values)))
    return xs, [show_value(v) for v in axis_values], numeric


def _final_accuracy_bars(sweep: Sweep, ax) -> None:
    members = [(m, _num(m.last("eval", "answer_acc"))) for m in sweep.members]
    members = [(m, acc) for m, acc in members if acc is not None]
    if not members:
        _no_data(ax, "no eval records yet")
        return
    xs = range(len(members))
    ax.bar(
        xs,
        [acc for _, acc in members],
        color="C0",
        hatch=["//" if _style(m.prompt_strategy) == "--" else "" for m, _ in members],
    )
    ax.set_xticks(
        list(xs),
        [_member_label(sweep, m) for m, _ in members],
        rotation=30,
        ha="right",
        fontsize="small",
    )


def _final_accuracy_lines(sweep: Sweep, ax) -> list:
    """Draws a line per (prompt strategy, depth, ...); returns the legend's handles."""
    field, axis_values = _other_axes(sweep)[0]
    xs, ticks, numeric = _x_positions(field, axis_values)
    line_axes = [(f, v) for f, v in sweep.axes if f != field]
    color_axes = [(f, v) for f, v in line_axes if f != PROMPT]  # style tells the prompt
    groups = {}
    for m in sweep.members:
        acc = _num(m.last("eval", "answer_acc"))
        if acc is not None and _axis_order(axis_values, m.values.get(field)) < len(xs):
            groups.setdefault(_group_key(m, line_axes), []).append(m)
    color_keys = sorted({_group_key(m, color_axes) for m in sweep.members})
    colors = dict(zip(color_keys, _colors(len(color_keys)), strict=True))
    handles = []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda m: _axis_order(axis_values, m.values.get(field)))
        x = [xs[_axis_order(axis_values, m.values.get(field))] for m in members]
        y = [_num(m.last("eval", "answer_acc")) for m in members]
        first = members[0]
        handles += ax.plot(
            x,
            y,
            _style(first.prompt_strategy),
            marker="o",
            color=colors[_group_key(first, color_axes)],
            label=_label(sweep, first, [f for f, _ in line_axes]),
        )
        unfinished = [
            (xi, yi) for xi, yi, m in zip(x, y, members, strict=True) if m.status != "finished"
        ]
        if unfinished:  # hollow: not final yet
            ax.plot(*zip(*unfinished, strict=True), "o", color="white", markersize=4)
    if field == VOCAB and numeric:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    ax.set_xticks(xs, ticks)
    ax.set_xlabel(short_names(sweep.axes)[field] + "  (hollow markers: not finished)")
    if not groups:
        _no_data(ax, "no eval records yet")
    return handles


def plot_final_accuracy(sweep: Sweep, path: str) -> str:
    """Final answer_acc against the swept parameter (a bar per member if none is swept)."""
    fig, ((ax,),) = _figure(width=6.0)
    if _other_axes(sweep):
        handles = _final_accuracy_lines(sweep, ax)
        if handles:  # outside, the plot keeps its width
            longest = max(len(h.get_label()) for h in handles)
            fig.set_size_inches(6.0 + 0.8 + 0.07 * longest, 4.0)
            fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    else:
        _final_accuracy_bars(sweep, ax)
    ax.set_ylabel("final eval answer accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(sweep.name)
    return _save(fig, path)


def _by_k(record: dict) -> tuple[list[int], list[float]]:
    points = sorted(
        (int(name[len("answer_acc_k") :]), _num(v))
        for name, v in record.items()
        if re.fullmatch(r"answer_acc_k\d+", name)
    )
    points = [(k, v) for k, v in points if v is not None]
    return [k for k, _ in points], [v for _, v in points]


def plot_accuracy_vs_k(sweep: Sweep, path: str) -> str | None:
    """answer_acc against the number of in-context examples K, from each last eval_by_k."""

    def by_k(m):
        records = m.kind("eval_by_k")
        return _by_k(records[-1]) if records else ([], [])

    return _depth_grid(
        sweep,
        path,
        [("answer accuracy by K", by_k)],
        xlabel="in-context examples kept (K; 1 = query only)",
    )


def plot_analysis_over_steps(sweep: Sweep, path: str) -> str | None:
    """parent_mass_query_best, embed_probe_r2 and embed_cka against step, per member."""
    rows = [
        (name, lambda m, name=name: _curve(m.kind("analysis"), name)) for name in ANALYSIS_CURVES
    ]
    return _depth_grid(sweep, path, rows, xlabel="step")


def plot_dag_heatmap(m: Member, path: str) -> str | None:
    """`analysis.plot_dag_recovery_heatmap` of the member's last analysis record with data."""
    record = next(
        (
            r
            for r in reversed(m.kind("analysis"))
            if _num(r.get("parent_mass_query_best")) is not None
        ),
        None,
    )
    if record is None:
        return None
    analysis.plot_dag_recovery_heatmap(record, path)
    return path


def write_plots(sweep: Sweep, out_dir: str) -> dict[str, str]:
    """Draws every plot the runs have data for; returns {plot name: path}."""
    plots = {
        "accuracy_vs_steps": plot_accuracy_vs_steps(
            sweep, os.path.join(out_dir, "accuracy_vs_steps.png")
        ),
        "final_accuracy": plot_final_accuracy(sweep, os.path.join(out_dir, "final_accuracy.png")),
        "accuracy_vs_k": plot_accuracy_vs_k(sweep, os.path.join(out_dir, "accuracy_vs_k.png")),
        "analysis_over_steps": plot_analysis_over_steps(
            sweep, os.path.join(out_dir, "analysis_over_steps.png")
        ),
    }
    for m in sweep.members:
        name = f"dag_heatmap_{m.index}"
        plots[name] = plot_dag_heatmap(m, os.path.join(out_dir, name + ".png"))
    return {name: path for name, path in plots.items() if path is not None}


def default_out_dir(workdir: str) -> str:
    """Where the command writes unless told: beside the run or sweep, never in it:
    `<WORKDIR>_report`, and for a member of a sweep `<SWEEP>_report/<member dir>`."""
    path = os.path.abspath(workdir)
    top = cli_errors.outermost_run_directory(path)
    if top == path:
        return top + "_report"
    return os.path.join(top + "_report", os.path.relpath(path, top))


def write_report(workdir: str, out_dir: str | None = None) -> dict:
    """Writes the table (Markdown, CSV) and plots of the sweep or run in `workdir` to `out_dir`
    (default: `default_out_dir(workdir)`).

    Returns {"out_dir", "markdown", "csv", "plots": {name: path}, "rows": table rows,
    "table": the table as text}. Raises ReportError if `workdir` holds no sweep and no run.
    """
    sweep = load_sweep(workdir)
    out_dir = out_dir or default_out_dir(workdir)
    os.makedirs(out_dir, exist_ok=True)
    rows = _rows(sweep)
    table = markdown_table(rows)
    plots = write_plots(sweep, out_dir)
    paths = {
        "markdown": os.path.join(out_dir, "summary.md"),
        "csv": os.path.join(out_dir, "summary.csv"),
    }
    with open(paths["markdown"], "w") as f:
        f.write(_markdown(sweep, table, plots))
    write_csv(paths["csv"], rows)
    return {"out_dir": out_dir, **paths, "plots": plots, "rows": rows, "table": table}


def run(workdir: str, out_dir: str | None = None) -> int:
    """The command: writes the report (never into a run directory) and prints the table and
    where it went; 1 on error."""
    out_dir = out_dir or default_out_dir(workdir)
    cli_errors.check_outside_runs("--out_dir", out_dir)
    try:
        report = write_report(workdir, out_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an unwritable --out_dir
        print(
            f"error: cannot write the report to {out_dir}: {cli_errors.describe(e)}",
            file=sys.stderr,
        )
        return 1
    print(report["table"])
    print(
        f"Report written to {report['out_dir']} (summary.md, summary.csv, "
        f"{len(report['plots'])} plots)"
    )
    return 0


@cli_errors.one_line
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    sys.exit(run(flags.FLAGS.workdir, flags.FLAGS.out_dir))


if __name__ == "__main__":
    # Flags are defined only when run as a command, so the trainer (whose main defines its own
    # --workdir) can import write_report.
    flags.DEFINE_string("workdir", None, "A sweep directory (sweep.json) or a single run.")
    flags.DEFINE_string(
        "out_dir",
        None,
        "Where to write the report, outside every run directory (a run may be training there). "
        "Default: beside WORKDIR, in WORKDIR_report (for a sweep's member, "
        "SWEEP_report/<member dir>).",
    )
    app.run(main)
