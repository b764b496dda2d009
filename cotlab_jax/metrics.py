"""Run metrics: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard.

Every record has a `step` and a `kind` (`train`, `eval`, ...). A resumed run first drops the
records past the step it resumes from (and a torn last line), so after any number of kills the
file holds each step exactly once, as an uninterrupted run would.
"""

import json
import math
import os


def read_metrics(path: str) -> list[dict]:
    """The complete records of a metrics file (a torn last line is skipped)."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash can only be the last
    return records


class MetricsWriter:
    """Appends records to `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tb`."""

    def __init__(self, workdir: str, resume_step: int, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        # A run (re)starting at step 0 writes its step-0 records again, so none is kept.
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] \
            if resume_step else []
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        if tensorboard:  # imported here: tensorboardX pulls in torch, seconds of start-up
            from tensorboardX import SummaryWriter
        # purge_step hides events of an earlier attempt past the resume point.
        self._tb = (SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)
                    if tensorboard else None)

    def write(self, step: int, kind: str, values: dict) -> None:
        # NaN (a metric with no data, e.g. a chain index no task reaches) is written as null.
        values = {name: None if isinstance(v, float) and not math.isfinite(v) else v
                  for name, v in values.items()}
        record = {"step": int(step), "kind": kind, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
