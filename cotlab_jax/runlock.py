"""One writer per run directory: `lock.json` (host, pid, start time), created atomically
(O_CREAT|O_EXCL) by the process that trains the run and removed when it ends.

A second process refuses, naming the holder. A lock left by a dead process on this host is
taken over; one from another host cannot be checked from here, so the user is told how to clear
it. Sweeps lock each member's run directory (not the sweep directory), so members may train in
separate processes (`--config.sweep.member=i`) while one member never has two writers.
"""

import contextlib
import json
import os
import socket
import time

LOCK_NAME = "lock.json"


class LockedError(RuntimeError):
    """The run directory is held by another process; the message says which."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """`with RunLock(workdir):` holds `workdir/lock.json` for the block."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.owner = dict(
            host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z")
        )
        self._held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def acquire(self) -> None:
        for _ in range(3):  # a lock removed between our attempts: try again
            if self._create():
                self._held = True
                return
            holder = _read(self.path)
            if holder is None:
                if not os.path.exists(self.path):
                    continue
                # Created a moment ago and not yet written, or garbled.
                time.sleep(0.2)
                holder = _read(self.path)
                if holder is None:
                    raise LockedError(
                        f"{self.path} exists but is unreadable; if no process trains this run, "
                        f"delete it and relaunch"
                    )
            host, pid = holder.get("host"), holder.get("pid")
            where = f"host {host}, pid {pid}, since {holder.get('started')}"
            if host == self.owner["host"] and isinstance(pid, int) and not _alive(pid):
                print(f"warning: taking over the lock of a dead process ({where})")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            if host == self.owner["host"]:
                raise LockedError(
                    f"{os.path.dirname(self.path)} is in use by another process "
                    f"({where}); wait for it to end or stop it"
                )
            raise LockedError(
                f"{os.path.dirname(self.path)} is locked by a process on another "
                f"host ({where}); if it no longer runs, delete {self.path} and "
                f"relaunch"
            )
        raise LockedError(f"could not take {self.path}: other processes keep taking it")

    def release(self) -> None:
        if self._held:
            holder = _read(self.path)
            if (
                holder is not None
                and holder.get("pid") == self.owner["pid"]
                and holder.get("host") == self.owner["host"]
            ):
                os.remove(self.path)
            self._held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
