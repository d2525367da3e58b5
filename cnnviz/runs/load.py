"""Reading a run directory back: its config, model, data and metrics (`load_run`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cnnviz.config.loading import read_yaml, validate
from cnnviz.config.root import Config
from cnnviz.errors import CnnvizError, first_line
from cnnviz.model.pretrained import PREFIX as PRETRAINED_PREFIX
from cnnviz.runs.layout import BACKUP_DIR


# --------------------------------------------------------------------------------- loading back
@dataclass
class Run:
    """A trained run (or a bare `.keras` file, then `config` and `directory` may be None)."""

    model: object
    config: Config | None
    directory: Path | None
    # A bare model that knows its own input mode (keras:NAME): what `--preprocess auto` means.
    preprocess: str | None = None
    # Names given for a bare model (`--class-names`, keras:NAME's ImageNet classes).
    class_names: list[str] | None = None
    _dataset: object = field(default=None, repr=False)

    def dataset(self):
        """The run's data, split exactly as when it was trained (same config, same seed)."""
        if self.config is None:
            raise CnnvizError(
                "a bare .keras file has no data set; pass image files with --images, or a run "
                "directory"
            )
        if self._dataset is None:  # several commands of one `cnnviz run` ask for it
            from cnnviz.data import load_dataset

            # A folder-trained run reads its recorded file lists: the folder is not listed.
            self._dataset = load_dataset(self.config, run_dir=self.directory)
        return self._dataset


def load_keras_model(path: str | Path):
    import zipfile

    import keras

    import cnnviz.model.optimizers  # noqa: F401 - registers the layerwise optimizers for deserialization

    if not zipfile.is_zipfile(path):  # Keras would say "File not found" of a truncated file
        raise CnnvizError(
            f"cannot load Keras model {path}: not a complete .keras file (truncated or damaged; "
            "a .keras file is a zip archive)"
        )
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many types for a bad file
        raise CnnvizError(f"cannot load Keras model {path}: {first_line(error)}") from None


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


def load_run(path: str | Path, *, weights: str | Path | None = None) -> Run:
    """Load a run directory (its model.keras and config.yaml), a `.keras` file, or a pretrained
    `keras:NAME` (`cnnviz.model.pretrained`; `weights`: a local weights file for it)."""
    if str(path).startswith(PRETRAINED_PREFIX):  # Path("keras:ResNet50") is a valid path too
        from cnnviz.model.pretrained import pretrained_model

        found = pretrained_model(str(path), weights=weights)
        return Run(model=found.model, config=None, directory=None,
                   preprocess=found.preprocess_mode, class_names=found.class_names)
    if weights is not None:
        raise CnnvizError(f"--weights {weights} is for pretrained models "
                          f"({PRETRAINED_PREFIX}NAME); {path} has its own weights")
    path = Path(path)
    if path.is_dir():
        model_file = path / "model.keras"
        config_file = path / "config.yaml"
        if not model_file.is_file():
            hint = " (training has not finished; run `cnnviz train` again to resume)" if (
                path / BACKUP_DIR).is_dir() else ""
            raise CnnvizError(f"{path} is not a finished run: no model.keras in it{hint}")
        config = (validate(read_yaml(config_file), source=str(config_file))
                  if config_file.is_file() else None)
        return Run(model=load_keras_model(model_file), config=config, directory=path)
    if path.suffix == ".keras" and path.is_file():
        return Run(model=load_keras_model(path), config=None, directory=None)
    if not path.exists():
        raise CnnvizError(f"{path} does not exist; give a run directory or a .keras file")
    raise CnnvizError(f"{path} is neither a run directory nor a .keras file")
