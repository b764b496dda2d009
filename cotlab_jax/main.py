"""`python -m cotlab_jax.main --config=configs/<file>.py[:arg] [--workdir=DIR] [--config.x=y]`.

Trains (or resumes) the run in `--workdir` (default `runs/<run name>`), evaluating on the frozen
eval set as it goes; see README.md for the run directory's contents. A config with `sweep.axes`
is a sweep (`cotlab_jax.sweep`): its members train in `--workdir` (default
`runs/<sweep name>`), packed where they can be, and end in a report.
"""

import os

import jax
from absl import app, flags

from cotlab_jax import cli_errors, config_flag
from cotlab_jax import config as config_lib

_CONFIG = config_flag.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<run name>.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Relaunch a run whose saved config differs in fields that change its data, model or numbers "
    "(refused otherwise; logging, evaluation and checkpoint cadences and the mesh may always "
    "change).",
)
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    None,
    "Call jax.distributed.initialize() (default: when a coordinator is configured, as on a TPU "
    "pod slice, under SLURM, with JAX_COORDINATOR_ADDRESS set, or with the flags below).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: detected from the cluster)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _launched_multihost() -> bool:
    if _MULTIHOST.value is not None:
        return _MULTIHOST.value
    if _COORDINATOR.value or _NUM_PROCESSES.value is not None:
        return True
    return (
        any(
            os.environ.get(name)
            for name in (
                "JAX_COORDINATOR_ADDRESS",
                "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS",
            )
        )
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    )


@cli_errors.one_line  # a RunError or ConfigError ends the command in one line
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/<file>.py is required")
    if _launched_multihost():
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from cotlab_jax import sweep, train  # after initialize(): they touch the devices

    config = _CONFIG.value
    for group, command in (("compress", "compress"), ("distill", "distill")):
        if group in config:  # the train step would ignore the teacher
            raise config_lib.ConfigError(
                f"this config has config.{group}: run it with python -m cotlab_jax.{command} "
                f"--teacher=RUN_DIR --config=..."
            )
    if config.sweep.axes:
        workdir = _WORKDIR.value or os.path.join("runs", config.sweep.name or "sweep")
        sweep.check_overrides(config, config_flag.overridden_fields())
        outcome = sweep.run(config, workdir)
        if outcome.get("report"):
            print(outcome["report"]["table"])
            print(f"report: {outcome['report']['out_dir']}")
        return
    workdir = _WORKDIR.value or os.path.join("runs", config_lib.run_name(config))
    results = train.train_and_evaluate(
        config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value
    )
    if jax.process_index() == 0 and "eval" in results:
        print(train.summary(results, workdir))


if __name__ == "__main__":
    app.run(main, flags_parser=config_flag.parse_flags)
