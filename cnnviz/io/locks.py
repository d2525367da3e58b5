"""Run ownership: an fcntl lock on RUN/.lock held for as long as a process trains into the run."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cnnviz.errors import CnnvizError
from cnnviz.io.atomic import write_problem

LOCK_FILE = ".lock"


# ------------------------------------------------------------------------------------- locks
class RunLock:
    """An exclusive `fcntl.flock` on RUN/.lock, held by the process training the run.

    The kernel releases it when that process ends, however it ends (even by SIGKILL), so a
    lock never outlives its owner; the file holds the owner's pid for messages.
    """

    def __init__(self, handle: int, path: Path):
        self._handle = handle
        self.path = path

    @classmethod
    def acquire(cls, path: Path) -> RunLock | None:
        """The lock on `path`, or None when another process (or handle) holds it."""
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise CnnvizError(write_problem(path, error)) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        return cls(handle, path)

    def release(self) -> None:
        if self._handle >= 0:
            os.close(self._handle)  # closing the last handle releases the flock
            self._handle = -1


def lock_holder(run_dir: Path) -> int | None:
    """The pid written by the process that holds (or last held) the run's lock."""
    try:
        return int((Path(run_dir) / LOCK_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def try_lock_run(run_dir: Path) -> RunLock | None:
    """Lock an existing run directory for training; None when a live process holds it."""
    return RunLock.acquire(Path(run_dir) / LOCK_FILE)
