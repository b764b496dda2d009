"""Run metrics: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard.

Every record has a `step` and a `kind` (`train`, `eval`, ...). A resumed run first drops the
records past the step it resumes from, so after any number of kills the file holds each step
exactly once, as an uninterrupted run would. A line that cannot be read (a torn last line after
a crash, a garbled line) is skipped and reported; the records after it are always kept.
"""

import contextlib
import errno
import json
import math
import os
import sys


class MetricsWriteError(OSError):
    """The metrics file could not be written (e.g. the disk is full)."""


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8 text
        return None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("step"), int)
        or not isinstance(record.get("kind"), str)
    ):
        return None
    return record


def read_metrics_report(path: str) -> tuple[list[dict], list[int]]:
    """(the readable records of a metrics file, the 1-based numbers of its unreadable lines)."""
    records, unreadable = [], []
    if not os.path.exists(path):
        return records, unreadable
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            record = _record(raw.decode("utf-8", errors="replace"))
            if record is None:
                unreadable.append(number)
            else:
                records.append(record)
    return records, unreadable


def read_metrics(path: str, warn: bool = True) -> list[dict]:
    """The readable records of a metrics file. Unreadable lines (a line torn by a crash, a
    garbled one) are skipped, never the records after them; with `warn`, one line on stderr
    names them."""
    records, unreadable = read_metrics_report(path)
    if unreadable and warn:
        print(
            f"warning: {path}: skipped unreadable line(s) {_ranges(unreadable)} "
            f"(kept the {len(records)} readable records)",
            file=sys.stderr,
        )
    return records


def _ranges(numbers: list[int]) -> str:
    """`1, 4-6, 9` for [1, 4, 5, 6, 9]."""
    spans, start = [], numbers[0]
    for previous, current in zip(numbers, numbers[1:] + [None], strict=True):
        if current != previous + 1:
            spans.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ", ".join(spans)


def describe_write_error(path: str, error: OSError) -> str:
    why = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    return f"cannot write {path}: {why}"


class MetricsWriter:
    """Appends records to `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tb`.

    A failed write (a full disk) raises `MetricsWriteError`; the records written before it stay
    in the file (a partly written line is skipped when the file is read back)."""

    def __init__(self, workdir: str, resume_step: int | None, tensorboard: bool = True):
        """`resume_step`: the checkpoint the run goes on from (the records up to it are kept),
        or None for a run that starts afresh and writes every record again, its step-0
        records included."""
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = (
            []
            if resume_step is None
            else [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        )
        tmp = self.path + ".tmp"
        try:  # a new file replaces the old one whole, or not at all
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as error:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise MetricsWriteError(error.errno, describe_write_error(self.path, error)) from None
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        if tensorboard:  # imported here: tensorboardX pulls in torch, seconds of start-up
            from tensorboardX import SummaryWriter
        # purge_step hides events of an earlier attempt past the resume point.
        purge_step = 0 if resume_step is None else resume_step + 1
        self._tb = (
            SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge_step)
            if tensorboard
            else None
        )

    def write(self, step: int, kind: str, values: dict) -> None:
        # NaN (a metric with no data, e.g. a chain index no task reaches) is written as null.
        values = {
            name: None if isinstance(v, float) and not math.isfinite(v) else v
            for name, v in values.items()
        }
        record = {"step": int(step), "kind": kind, **values}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:
            raise MetricsWriteError(error.errno, describe_write_error(self.path, error)) from None
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a failed flush was already reported by write()
            self._file.close()
        if self._tb is not None:
            self._tb.close()
