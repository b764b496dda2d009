"""Sweeps: a config's `sweep.axes` expanded into member runs, packed, trained, and reported.

    python -m cotlab_jax.main --config=configs/sweep.py:vocab --workdir=runs/vocab

The members are the product of the axes' values (first axis slowest). Each gets its own run
directory under the sweep's workdir, named in the reference's style (`config.run_name`, plus the
swept fields that name does not spell out), with its own config, eval set, metrics and
checkpoints: exactly what a single run writes, so every run tool works on a member. Members whose
programs agree (`packed.pack_key`) train together as one vmapped program; the other groups run
one after another. A relaunch skips finished members (and members that diverged: delete their
`failed.json` to retry) and resumes the rest from their checkpoints. `sweep.member=i` runs member
i alone, to fan a sweep out over hosts or slices. The sweep's `sweep.json` lists the axes and
members; `python -m cotlab_jax.report` turns the finished sweep into tables and plots. With
`sweep.packing="size"` the finished sweep is also evaluated with members that differ only in
model sizes in one size-packed program per task shape (`sweep_eval.evaluate_sweep`), into
`size_packed_eval.json`. The plan printed at the start names every program's members and why
they share it.
"""

import dataclasses
import itertools
import json
import os

import jax
import ml_collections

from cotlab_jax import config as config_lib
from cotlab_jax import data, experiment, packed, rundir, size_packing, sweep_eval, train

SIZE_PACKED_EVAL = "size_packed_eval.json"


@dataclasses.dataclass(frozen=True)
class Member:
    index: int
    values: dict  # field path -> the member's value
    config: ml_collections.ConfigDict
    name: str  # its run directory, relative to the sweep's workdir


def get_field(config, path: str):
    """`config.<path>` for a dotted path; KeyError if there is no such field."""
    value = config
    for name in path.split("."):
        if value is None or name not in value:
            raise KeyError(path)
        value = value[name]
    return value


def set_field(config, path: str, value) -> None:
    """`config.<path> = value` for a dotted path."""
    *parents, name = path.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[name] = value


def _normalise(path: str, value):
    """Choice fields take a single value or a tuple of choices."""
    if path.endswith("_choices") and isinstance(value, int):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


def _short(path: str) -> str:
    return path.split(".")[-1].removesuffix("_choices")


def _value_text(value) -> str:
    if isinstance(value, (tuple, list)):
        return "-".join(str(v) for v in value)
    return str(value)


def expand(config: ml_collections.ConfigDict) -> list[Member]:
    """The sweep's members, each config validated (so a bad member fails before compiling)."""
    config_lib.validate_sweep(config.sweep)
    axes = [(path, [_normalise(path, v) for v in values]) for path, values in config.sweep.axes]
    for path, _ in axes:
        try:
            get_field(config, path)
        except KeyError:
            raise config_lib.ConfigError(
                f"config.sweep.axes names {path!r}, which is not a config field"
            ) from None
    members, names = [], set()
    for index, combo in enumerate(itertools.product(*(values for _, values in axes))):
        values = dict(zip((path for path, _ in axes), combo, strict=True))
        member = ml_collections.ConfigDict(config.to_dict())
        for path, value in values.items():
            set_field(member, path, value)
        member.sweep.member = index
        try:
            experiment.setup(member)
        except config_lib.ConfigError as error:
            raise config_lib.ConfigError(f"sweep member {index} {values}: {error}") from None
        name = config_lib.run_name(member) + "".join(
            f"_{_short(path)}_{_value_text(value)}"
            for path, value in values.items()
            if path not in config_lib.RUN_NAME_FIELDS
        )
        if name in names:
            name = f"{name}_member_{index}"
        names.add(name)
        members.append(Member(index=index, values=values, config=member, name=name))
    return members


def check_overrides(config: ml_collections.ConfigDict, overridden: list[str]) -> None:
    """Refuses command-line overrides (`--config.<path>=...`, their dotted paths) of a field
    that the sweep's axes set for every member, which would silently replace them."""
    for path in overridden:
        for axis, values in config.sweep.axes:
            if path == axis or axis.startswith(path + ".") or path.startswith(axis + "."):
                raise config_lib.ConfigError(
                    f"--config.{path} overrides a swept field: config.sweep.axes sweeps {axis} "
                    f"over {tuple(values)}, so every member sets it. Drop the override (one "
                    f"member alone: --config.sweep.member=i), or sweep other values by editing "
                    f"the sweep's axes"
                )


def member_status(member: Member, workdir: str) -> tuple[str, int]:
    """("finished" | "failed" | "pending", the step it would resume from)."""
    run_dir = os.path.join(workdir, member.name)
    if os.path.exists(os.path.join(run_dir, "failed.json")):
        return "failed", 0
    results = os.path.join(run_dir, "results.json")
    total = member.config.train.n_tasks // member.config.train.batch_size
    if os.path.exists(results):
        with open(results) as f:
            if json.load(f).get("step") == total:
                return "finished", total
    return "pending", rundir.latest_checkpoint(run_dir, member.config.train.keep_checkpoints) or 0


def plan(
    members: list[Member], starts: dict[int, int], packing: str, max_pack_size: int = 0
) -> list[list[Member]]:
    """Packs of members to train together, in order of their first member: members that share a
    `packed.pack_key` and a resume step (`starts`), at most `max_pack_size` (0: any) per pack."""
    groups: dict[tuple, list[Member]] = {}
    for m in members:
        key = (
            (m.index,)
            if packing == "off"
            else (packed.pack_key(m.config, same_length=packing == "exact"), starts[m.index])
        )
        groups.setdefault(key, []).append(m)
    size = max_pack_size or len(members)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def evaluation_groups(members: list[Member]) -> list[list[Member]]:
    """Members that `sweep.packing="size"` evaluates in one size-packed program: one task spec
    and eval settings, models that differ at most in `size_packing.SIZE_FIELDS`."""
    groups: dict[tuple, list[Member]] = {}
    for m in members:
        spec = data.TaskSpec.from_config(m.config)
        model_config = experiment.model_config(m.config, spec)
        settings = ("n_eval_tasks", "batch_size", "max_pred_tokens", "example_counts")
        key = (
            spec,
            size_packing.shared_fields(model_config),
            tuple(m.config.eval[name] for name in settings),
        )
        groups.setdefault(key, []).append(m)
    return list(groups.values())


def _differing(pack: list[Member], paths) -> list[str]:
    return [p for p in paths if len({str(get_field(m.config, p)) for m in pack}) > 1]


def describe_plan(packs: list[list[Member]], packing: str, members: list[Member]) -> list[str]:
    """The plan's lines: which members share each program, and why."""
    lines = []
    for i, pack in enumerate(packs):
        swept = sorted({path for m in pack for path in m.values})
        apart = _differing(pack, swept)
        why = (
            "alone (sweep.packing='off')"
            if packing == "off"
            else (
                "one model, vocabulary, batch, schedule and loop settings (packed.pack_key)"
                + (f"; they differ in {', '.join(apart)}" if apart else "")
            )
        )
        lines.append(f"  train program {i}: members {[m.index for m in pack]}: {why}")
    if packing == "size":
        size_paths = [f"model.{name}" for name in size_packing.SIZE_FIELDS]
        for i, group in enumerate(evaluation_groups(members)):
            apart = _differing(group, size_paths)
            sizes = f"sizes differ in {', '.join(apart)}" if apart else "same sizes"
            lines.append(
                f"  final size-packed evaluation program {i}: members "
                f"{[m.index for m in group]}: one task spec and eval settings, {sizes}"
            )
    return lines


def write_index(config: ml_collections.ConfigDict, members: list[Member], workdir: str) -> None:
    index = dict(
        name=config.sweep.name,
        axes=[[path, [_normalise(path, v) for v in values]] for path, values in config.sweep.axes],
        members=[dict(index=m.index, dir=m.name, values=m.values) for m in members],
    )
    if jax.process_index() == 0:
        rundir.make_workdir(workdir)  # one line if it cannot be (a file, unwritable)
        rundir.write_json(os.path.join(workdir, "sweep.json"), index)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the sweep's unfinished members (or only `sweep.member`), then writes the report
    once every member has ended. Returns {"members": [(name, status)], "report": paths}."""
    members = expand(config)
    selected = members
    if config.sweep.member >= 0:
        if config.sweep.member >= len(members):
            raise config_lib.ConfigError(
                f"config.sweep.member={config.sweep.member} is invalid: the sweep has "
                f"{len(members)} members (0 .. {len(members) - 1})"
            )
        selected = [members[config.sweep.member]]
    write_index(config, members, workdir)
    status = {m.index: member_status(m, workdir) for m in selected}
    pending = [m for m in selected if status[m.index][0] == "pending"]
    packs = plan(
        pending,
        {i: start for i, (_, start) in status.items()},
        config.sweep.packing,
        config.sweep.max_pack_size,
    )
    ended = len(selected) - len(pending)
    print(
        f"sweep {config.sweep.name or '(unnamed)'}: {len(members)} members, {ended} ended, "
        f"{len(pending)} to train in {len(packs)} program(s) of sizes "
        f"{[len(p) for p in packs]}"
    )
    for line in describe_plan(packs, config.sweep.packing, selected):
        print(line)
    for pack in packs:
        results = train.train_members([(m.config, os.path.join(workdir, m.name)) for m in pack])
        if any("preempted_at_step" in r for r in results):
            return dict(preempted=True)
        for m, r in zip(pack, results, strict=True):
            if "error" in r:
                print(f"member {m.index} ({m.name}) failed: {r['error']}")
    final = [(m.name, member_status(m, workdir)[0]) for m in members]
    report = None
    if all(s != "pending" for _, s in final) and jax.process_index() == 0:
        from cotlab_jax import report as report_lib  # matplotlib, only when a report is due

        report = report_lib.write_report(workdir, os.path.join(workdir, "report"))
        if config.sweep.packing == "size":
            evaluation = sweep_eval.evaluate_sweep(
                workdir,
                answer_rule=config.eval.answer_rule,
                example_counts=config.eval.example_counts or None,
            )
            rundir.write_json(os.path.join(workdir, SIZE_PACKED_EVAL), evaluation)
    return dict(members=final, report=report)
