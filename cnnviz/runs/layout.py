"""Run directories: where a run's files go, how they are written (atomically), how a run is loaded.

A run directory `outputs/<run slug>/<timestamp>/` holds config.yaml, model.keras, history.csv,
metrics.json, curves.png, checkpoints/ and, while training is unfinished, backup/ (the training
state it resumes from). It appears complete and locked (`RunLock`) in one rename, with its
config.yaml already inside, so no other process can see or take over a half-made run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from cnnviz.config.loading import Config, read_yaml, validate
from cnnviz.errors import CnnvizError

BACKUP_DIR = "backup"
LOCK_FILE = ".lock"


# ------------------------------------------------------------------------------ kill points
_KILL_COUNTS: dict[str, int] = {}


def kill_point(name: str) -> None:
    """For tests only: SIGKILL this process at a named instant of a write.

    When the environment variable CNNVIZ_TEST_KILL_AT is `name` (or `name#n`: its n-th time in
    this process), the process kills itself right here, so a test can stop a real process
    between a temporary file and its rename, which a timer hits only by luck.
    """
    wanted = os.environ.get("CNNVIZ_TEST_KILL_AT")
    if not wanted:
        return
    target, _, occurrence = wanted.partition("#")
    if target != name:
        return
    _KILL_COUNTS[name] = _KILL_COUNTS.get(name, 0) + 1
    if _KILL_COUNTS[name] == int(occurrence or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------- temporary names, errors
# `.NAME.<pid>-<8 hex>.tmp[.keras|.weights.h5]`: Keras insists on its own suffixes.
_TEMPORARY = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp(\.keras|\.weights\.h5)?$")
_CLEANED_FOLDERS: set[Path] = set()


def temporary_path(path: Path, suffix: str = "") -> Path:
    """A hidden name beside `path` to write it under before the rename.

    The name carries this process's id, so a later process can tell a temporary file left by
    a killed process (removed by `remove_stale_temporaries`) from one being written right now.
    """
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files (and folders) that killed processes left in `folder`."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def write_problem(path: Path, error: OSError) -> str:
    """One line saying why `path` could not be written, and what to do."""
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"cannot write {path}: no space left ({error.strerror}); free some space or use --out elsewhere"
    if code == errno.EROFS:
        return f"cannot write {path}: the file system is read-only; use --out with a writable folder"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write {path}: permission denied; use --out with a folder you can write to"
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((parent for parent in [path, *path.parents] if parent.is_file()), None)
        if blocker is not None:
            return f"cannot write {path}: {blocker} is a file, not a folder"
    if code == errno.ENAMETOOLONG:
        return f"cannot write {path}: the name is too long for the file system"
    return f"cannot write {path}: {error.strerror or error}"


def make_folder(folder: str | Path) -> Path:
    """`mkdir -p` whose failure is one line naming the folder; stale temporaries are removed
    once per folder and process."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:  # a file where the folder should be
        raise CnnvizError(write_problem(folder, error)) from None
    except OSError as error:
        raise CnnvizError(write_problem(folder, error)) from None
    if folder not in _CLEANED_FOLDERS:
        _CLEANED_FOLDERS.add(folder)
        remove_stale_temporaries(folder)
    return folder


# ------------------------------------------------------------------------------ atomic writes
def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    """Write `payload` to a temporary file beside `path`, then rename it into place.

    A crash or kill leaves either the old file or the new one, never a truncated file. The file
    gets the mode the umask gives (0644 under the usual 022), as a plain `open` would.
    """
    path = Path(path)
    make_folder(path.parent)
    temporary = temporary_path(path)
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        kill_point(f"{path.name}:written")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise CnnvizError(write_problem(path, error)) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    kill_point(f"{path.name}:renamed")
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: dict) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def save_figure(figure, path: str | Path, dpi: int = 100) -> Path:
    """Render a matplotlib Figure to PNG and write it atomically."""
    from cnnviz.plot import render_png

    return atomic_write_bytes(path, render_png(figure, dpi=dpi))


def _save_through_temporary(save, path: Path, suffix: str) -> Path:
    make_folder(path.parent)
    temporary = temporary_path(path, suffix)
    try:
        save(temporary)
        kill_point(f"{path.name}:written")
        os.replace(temporary, path)
    except OSError as error:
        raise CnnvizError(write_problem(path, error)) from None
    except RuntimeError as error:
        # h5py reports a failed write (a full disk) as RuntimeError("... errno = 28 ...").
        number = re.search(r"errno = (\d+)", str(error))
        if number is None:
            raise
        code = int(number.group(1))
        raise CnnvizError(write_problem(path, OSError(code, os.strerror(code)))) from None
    finally:
        temporary.unlink(missing_ok=True)
    kill_point(f"{path.name}:renamed")
    return path


def save_model(model, path: str | Path) -> Path:
    """`model.save` to a temporary `.keras` name, then rename (Keras insists on the suffix)."""
    return _save_through_temporary(model.save, Path(path), ".keras")


def save_weights(model, path: str | Path) -> Path:
    """`model.save_weights` (weights and optimizer state) to a temporary name, then rename."""
    return _save_through_temporary(model.save_weights, Path(path), ".weights.h5")


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


def set_aside(path: Path, label: str) -> Path:
    """Rename `path` to `<name>.<label>-<timestamp>` beside it (kept, not deleted)."""
    target = path.with_name(f"{path.name}.{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    index = 2
    while target.exists():
        target = path.with_name(f"{path.name}.{label}-{time.strftime('%Y%m%d-%H%M%S')}-{index}")
        index += 1
    os.rename(path, target)
    return target


def remove_tree(path: Path) -> None:
    """Delete a folder so that a kill part-way leaves either all of it or a hidden temporary."""
    if not path.exists():
        return
    doomed = temporary_path(path)
    os.rename(path, doomed)
    kill_point(f"{path.name}:removing")
    shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------------------------- loading back
@dataclass
class Run:
    """A trained run (or a bare `.keras` file, then `config` and `directory` may be None)."""

    model: object
    config: Config | None
    directory: Path | None
    _dataset: object = field(default=None, repr=False)

    def dataset(self):
        """The run's data, split exactly as when it was trained (same config, same seed)."""
        if self.config is None:
            raise CnnvizError(
                "a bare .keras file has no data set; pass image files with --images, or a run directory"
            )
        if self._dataset is None:  # several commands of one `cnnviz run` ask for it
            from cnnviz.data import load_dataset

            # A folder-trained run reads its recorded file lists: the folder is not listed.
            self._dataset = load_dataset(self.config, run_dir=self.directory)
        return self._dataset


def load_keras_model(path: str | Path):
    import zipfile

    import keras

    import cnnviz.model.build  # noqa: F401 - registers the layerwise optimizers for deserialization

    if not zipfile.is_zipfile(path):  # Keras would say "File not found" of a truncated file
        raise CnnvizError(
            f"cannot load Keras model {path}: not a complete .keras file (truncated or damaged; "
            "a .keras file is a zip archive)"
        )
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many types for a bad file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CnnvizError(f"cannot load Keras model {path}: {first_line}") from None


def read_metrics(run_dir: Path | None) -> dict:
    """A run's metrics.json ({} when there is none), or one line saying it is damaged."""
    if run_dir is None or not (Path(run_dir) / "metrics.json").is_file():
        return {}
    path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CnnvizError(
            f"{path} is damaged ({error}); retrain the run, or delete the file to use the run "
            "without its class names and preprocessing"
        ) from None
    if not isinstance(metrics, dict):
        raise CnnvizError(f"{path} is damaged (not a JSON object); retrain the run")
    return metrics


def load_run(path: str | Path) -> Run:
    """Load a run directory (its model.keras and config.yaml) or a `.keras` file."""
    path = Path(path)
    if path.is_dir():
        model_file = path / "model.keras"
        config_file = path / "config.yaml"
        if not model_file.is_file():
            hint = " (training has not finished; run `cnnviz train` again to resume)" if (
                path / BACKUP_DIR).is_dir() else ""
            raise CnnvizError(f"{path} is not a finished run: no model.keras in it{hint}")
        config = validate(read_yaml(config_file), source=str(config_file)) if config_file.is_file() else None
        return Run(model=load_keras_model(model_file), config=config, directory=path)
    if path.suffix == ".keras" and path.is_file():
        return Run(model=load_keras_model(path), config=None, directory=None)
    if not path.exists():
        raise CnnvizError(f"{path} does not exist; give a run directory or a .keras file")
    raise CnnvizError(f"{path} is neither a run directory nor a .keras file")
