"""Run directories: where a run's files go, how they are written (atomically), how a run is loaded.

A run directory `outputs/<config-name>/<timestamp>/` holds config.yaml, model.keras, history.csv,
metrics.json, curves.png, checkpoints/ and, while training is unfinished, backup/ (Keras's
BackupAndRestore state). The resolved config is saved first, so a run can always be rebuilt.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cnnviz.config import Config, read_yaml, validate
from cnnviz.errors import CnnvizError

BACKUP_DIR = "backup"


# ------------------------------------------------------------------------------ atomic writes
def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    """Write `payload` to a temporary file beside `path`, then rename it into place.

    A crash or kill leaves either the old file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: dict) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def save_figure(figure, path: str | Path, dpi: int = 100) -> Path:
    """Render a matplotlib Figure to PNG and write it atomically."""
    from cnnviz.plot import render_png

    return atomic_write_bytes(path, render_png(figure, dpi=dpi))


def save_model(model, path: str | Path) -> Path:
    """`model.save` to a temporary `.keras` name, then rename (Keras insists on the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.partial.keras")
    try:
        model.save(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------- run directories
def new_run_dir(out_root: str | Path, name: str) -> Path:
    """Create `out_root/name/<timestamp>`; never reuses an existing directory."""
    parent = Path(out_root) / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in [""] + [f"-{index}" for index in range(2, 1000)]:
        candidate = parent / f"{stamp}{suffix}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise CnnvizError(f"could not create a new run directory under {parent}")


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
    import keras

    import cnnviz.model  # noqa: F401 - registers the layerwise optimizers for deserialization

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many types for a bad file
        raise CnnvizError(f"cannot load Keras model {path}: {error}") from None


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
