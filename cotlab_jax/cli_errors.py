"""The commands' handling of what goes wrong: `@one_line` on a command's `main(argv)` turns the
errors a user can cause (a damaged or missing run, a bad config, an unwritable path) into one
line `error: ...` and a non-zero exit, no traceback, and keeps library INFO logs (orbax logs
every checkpoint it opens) off the terminal; warnings and errors still show. The write checks
run before a command's work; the commands that read runs (`evaluate`, `export`, `report`) never
write into a run or sweep directory, which may be training.
"""

import functools
import os
import sys

from absl import app, logging

from cotlab_jax import config as config_lib


class CommandError(RuntimeError):
    """An error a user's input or files cause (e.g. `rundir.RunError`): its message is the
    line the command ends with."""


# The errors that describe the user's input or files, not a bug. (This module imports nothing
# that touches devices, so a command may use it before `jax.distributed.initialize()`.)
KNOWN_ERRORS = (CommandError, config_lib.ConfigError, OSError)


def describe(error: BaseException) -> str:
    """One line for a known error (an OSError names its path and reason, not its errno)."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _not_a_notice(record) -> bool:
    # Orbax warns on every read-only open, which is how readers open checkpoints on purpose.
    return not record.getMessage().startswith("Given directory is read only")


def quiet_libraries() -> None:
    """absl logs at WARNING and above (orbax's INFO lines, a dozen per checkpoint opened, go)."""
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_not_a_notice)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow/TensorStore C++ INFO lines


def one_line(main):
    """Wraps a command's `main(argv)` (see the module docstring); a missing or unexpected
    argument (`app.UsageError`) is one line too."""

    @functools.wraps(main)
    def wrapped(argv):
        quiet_libraries()
        try:
            return main(argv)
        except KNOWN_ERRORS as error:
            sys.exit(f"error: {describe(error)}")
        except app.UsageError as error:  # absl would print the module's docstring first
            sys.exit(f"error: {error} (--help lists the flags)")

    return wrapped


def _unwritable(path: str) -> str | None:
    """Why a directory could not be created at `path` (or written in, if it exists), or None;
    nothing is created."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    return None


def check_writable_file(flag: str, path: str) -> None:
    """Exits with one line unless a file can be written at `path` (its directory may be
    missing: it is created when the file is written). Run before the work whose result goes
    there; it writes nothing."""
    if os.path.isdir(path):
        sys.exit(f"error: {flag}={path} is a directory; expected a file path")
    why = _unwritable(os.path.dirname(os.path.abspath(path)))
    if why:
        sys.exit(f"error: {flag}={path}: cannot write there ({why})")


def check_writable_dir(flag: str, path: str) -> None:
    """Exits with one line unless `path` is, or can be created as, a writable directory; it
    writes nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        sys.exit(f"error: {flag}={path} is a file; expected a directory")
    why = _unwritable(path)
    if why:
        sys.exit(f"error: {flag}={path}: cannot write there ({why})")


def is_run_directory(path: str) -> bool:
    """Whether `path` holds a run (or a sweep) that a command must not write into."""
    return any(
        os.path.exists(os.path.join(path, name))
        for name in ("config.json", "checkpoints", "metrics.jsonl", "sweep.json")
    )


def inside_run_directory(path: str) -> str | None:
    """The run directory `path` is, or lies in (None if none)."""
    path = os.path.abspath(path)
    while True:
        if os.path.isdir(path) and is_run_directory(path):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def outermost_run_directory(path: str) -> str:
    """The outermost run or sweep directory that `path` lies in (a sweep holds its members' run
    directories, at any depth); `path` itself (absolute) when none holds it."""
    path = top = os.path.abspath(path)
    while (parent := os.path.dirname(path)) != path:
        path = parent
        if is_run_directory(path):
            top = path
    return top


def check_outside_runs(flag: str, path: str) -> None:
    """Exits with one line if `path` is, or lies in, a run or sweep directory."""
    run_dir = inside_run_directory(path)
    if run_dir is not None:
        sys.exit(
            f"error: {flag}={path}: {run_dir} is a run directory, which this command never "
            f"writes into; choose a path outside it"
        )
