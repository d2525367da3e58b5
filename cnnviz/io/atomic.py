"""Writing files so that a kill never leaves half a file: temporary name, fsync, rename; stale
temporaries of dead processes removed; kill points for tests."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import signal
import time
from pathlib import Path

from cnnviz.errors import CnnvizError

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
    # A killed process whose parent has not reaped it yet still answers signal 0, but a zombie
    # writes nothing more: its temporaries are stale.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


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
        return (f"cannot write {path}: no space left ({error.strerror}); free some space or use "
                "--out elsewhere")
    if code == errno.EROFS:
        return (f"cannot write {path}: the file system is read-only; use --out with a writable "
                "folder")
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


def save_picture(picture, path: str | Path) -> Path:
    """Encode an RGB uint8 picture drawn without matplotlib (`plot.map_grid`) as PNG and write
    it atomically: `save_figure`'s twin for pictures."""
    from cnnviz.plot import png_bytes

    return atomic_write_bytes(path, png_bytes(picture))


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
