"""Run directories: where a run's files go, how they are written (atomically), how a run is loaded.

A run directory `outputs/<run slug>/<timestamp>/` holds config.yaml, model.keras, history.csv,
metrics.json, curves.png, checkpoints/ and, while training is unfinished, backup/ (the training
state it resumes from). It appears complete and locked (`RunLock`) in one rename, with its
config.yaml already inside, so no other process can see or take over a half-made run.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from pathlib import Path

from cnnviz.errors import CnnvizError
from cnnviz.io.atomic import (
    atomic_write_text,
    kill_point,
    make_folder,
    temporary_path,
    write_problem,
)
from cnnviz.io.locks import LOCK_FILE, RunLock

BACKUP_DIR = "backup"


# ---------------------------------------------------------------------------- run directories
_RUN_ID = re.compile(r"^(\d{8}-\d{6})(?:-(\d+))?$")


def run_ids(parent: Path) -> list[Path]:
    """The run directories under `parent`, newest first (`20250101-120000-2` after `...-120000`)."""
    found = []
    for entry in parent.iterdir() if parent.is_dir() else []:
        match = _RUN_ID.match(entry.name)
        if match and entry.is_dir():
            found.append(((match.group(1), int(match.group(2) or 1)), entry))
    return [entry for _, entry in sorted(found, reverse=True)]


def create_run_dir(out_root: str | Path, slug: str, config_text: str) -> tuple[Path, RunLock]:
    """Create `out_root/slug/<timestamp>` holding config.yaml and an empty backup/, locked.

    The directory is assembled under a temporary name and renamed into place, so it appears
    whole, already locked: two processes started in the same second get two directories
    (`<timestamp>` and `<timestamp>-2`), and no process ever sees a run without its config.
    """
    parent = make_folder(Path(out_root) / slug)
    staging = temporary_path(parent / "run")
    try:
        staging.mkdir()
    except OSError as error:
        raise CnnvizError(write_problem(parent, error)) from None
    lock = RunLock.acquire(staging / LOCK_FILE)  # a fresh file: nobody else can hold it
    try:
        atomic_write_text(staging / "config.yaml", config_text)
        (staging / BACKUP_DIR).mkdir()
        kill_point("run:staged")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in [""] + [f"-{index}" for index in range(2, 1000)]:
            candidate = parent / f"{stamp}{suffix}"
            try:
                os.rename(staging, candidate)  # fails if the name is taken (a non-empty folder)
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise CnnvizError(write_problem(candidate, error)) from None
            lock.path = candidate / LOCK_FILE
            return candidate, lock
        raise CnnvizError(f"could not create a new run directory under {parent}")
    except BaseException:
        lock.release()
        shutil.rmtree(staging, ignore_errors=True)
        raise
