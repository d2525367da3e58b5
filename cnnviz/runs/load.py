"""Reading a run directory back: its config, model, data and metrics (`load_run`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cnnviz.config.loading import read_yaml, validate
from cnnviz.config.root import Config
from cnnviz.errors import CnnvizError, first_line
from cnnviz.model.exported import exported_format, is_exported
from cnnviz.model.pretrained import PREFIX as PRETRAINED_PREFIX
from cnnviz.runs.layout import BACKUP_DIR


# --------------------------------------------------------------------------------- loading back
@dataclass
class Run:
    """A trained run (or a bare `.keras` / `.h5` file or an exported `.tflite` / `.onnx` /
    SavedModel, then `config` and `directory` are None)."""

    model: object
    config: Config | None
    directory: Path | None
    # A bare model that knows its own input mode (keras:NAME, an exported model): what
    # `--preprocess auto` means, and a one-line note when that is a guess.
    preprocess: str | None = None
    preprocess_note: str | None = None
    # Names given for a bare model (`--class-names`, keras:NAME's ImageNet classes).
    class_names: list[str] | None = None
    _dataset: object = field(default=None, repr=False)

    def dataset(self):
        """The run's data, split exactly as when it was trained (same config, same seed)."""
        if self.config is None:
            raise CnnvizError(
                "a bare model file (.keras, .h5 or an exported one) has no data set; pass image "
                "files with --images, or a run directory"
            )
        if self._dataset is None:  # several commands of one `cnnviz run` ask for it
            from cnnviz.data import load_dataset

            # A folder-trained run reads its recorded file lists: the folder is not listed.
            self._dataset = load_dataset(self.config, run_dir=self.directory)
        return self._dataset


# What `load_run` takes besides a run directory; Keras picks the format by the suffix.
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_ACCEPTED = ("a run directory, a .keras, .h5 or .hdf5 model file, keras:NAME, or an exported "
             ".tflite, .onnx or SavedModel folder")
# Every refusal of Keras's safe mode (Lambda code, TFSMLayer, torch modules) tells the user this.
# Keras enforces safe mode for legacy .h5 files too (its h5 loader deserializes the config inside
# a SafeModeScope, nested models and Keras 2 lambdas included): tests/test_legacy_h5.py holds it.
_SAFE_MODE_HINT = "safe_mode=False"


def load_keras_model(path: str | Path, *, unsafe: bool = False):
    """A Keras model from a `.keras` file or a legacy Keras `.h5` / `.hdf5` file, uncompiled.

    Args:
        path: the model file; its suffix says the format (`MODEL_SUFFIXES`).
        unsafe: also rebuild what Keras's safe mode refuses: a `Lambda` layer's Python code,
            which could run arbitrary code while loading (`safe_mode=False`; CLI `--unsafe`).

    Returns:
        The model. A truncated or damaged file, or one holding code while `unsafe` is False,
        raises `CnnvizError` naming the file.
    """
    import keras

    import cnnviz.model.optimizers  # noqa: F401 - registers the layerwise optimizers for deserialization

    _check_complete(Path(path))
    try:
        return keras.models.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as error:  # noqa: BLE001 - Keras raises many types for a bad file
        if _SAFE_MODE_HINT in str(error):
            raise CnnvizError(_refusal(path, error)) from None
        raise CnnvizError(f"cannot load Keras model {path}: {first_line(error)}") from None


def _check_complete(path: Path) -> None:
    """Refuse a truncated file in one line: Keras would say "File not found" of a .keras one
    and pass h5py's long open error through for a .h5 one."""
    if path.suffix == ".keras":
        import zipfile

        complete, kind = zipfile.is_zipfile(path), "a .keras file is a zip archive"
    else:
        import h5py

        try:
            h5py.File(path, "r").close()
            complete = True
        except OSError:
            complete = False
        kind = "a .h5 model is an HDF5 file"
    if not complete:
        raise CnnvizError(f"cannot load Keras model {path}: not a complete {path.suffix} file "
                          f"(truncated or damaged; {kind})")


def _refusal(path: str | Path, error: Exception) -> str:
    """Keras's safe-mode error as one line naming the file, what it holds and `--unsafe`."""
    found = re.match(r"Requested the (.+?)\. ", str(error))
    what = found.group(1) if found else "Python code in the file"
    return (f"refusing to load Keras model {path}: Keras's safe mode refused the {what}, since "
            "arbitrary code could run when loading it; pass --unsafe if you trust the file")


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


def load_run(path: str | Path, *, weights: str | Path | None = None, unsafe: bool = False) -> Run:
    """Load a run directory (its model.keras and config.yaml), a bare model file (`.keras`, or a
    legacy Keras `.h5` / `.hdf5`), a pretrained `keras:NAME` (`cnnviz.model.pretrained`;
    `weights`: a local weights file for it), or an exported `.tflite`, `.onnx` or SavedModel
    folder (`cnnviz.model.exported.ExportedModel`: forward passes only, see `require_keras`).
    `unsafe`: see `load_keras_model` (CLI `--unsafe`; exported files hold no Python code)."""
    if str(path).startswith(PRETRAINED_PREFIX):  # Path("keras:ResNet50") is a valid path too
        from cnnviz.model.pretrained import pretrained_model

        found = pretrained_model(str(path), weights=weights)
        return Run(model=found.model, config=None, directory=None,
                   preprocess=found.preprocess_mode, class_names=found.class_names)
    if weights is not None:
        raise CnnvizError(f"--weights {weights} is for pretrained models "
                          f"({PRETRAINED_PREFIX}NAME); {path} has its own weights")
    path = Path(path)
    if exported_format(path) is not None:
        return _exported_run(path)
    if path.is_dir():
        model_file = path / "model.keras"
        config_file = path / "config.yaml"
        if not model_file.is_file():
            hint = " (training has not finished; run `cnnviz train` again to resume)" if (
                path / BACKUP_DIR).is_dir() else ""
            raise CnnvizError(f"{path} is not a finished run: no model.keras in it{hint}")
        config = (validate(read_yaml(config_file), source=str(config_file))
                  if config_file.is_file() else None)
        return Run(model=load_keras_model(model_file, unsafe=unsafe), config=config, directory=path)
    if path.suffix in MODEL_SUFFIXES and path.is_file():
        return Run(model=load_keras_model(path, unsafe=unsafe), config=None, directory=None)
    if not path.exists():
        raise CnnvizError(f"{path} does not exist; give {_ACCEPTED}")
    raise CnnvizError(f"{path} is neither a run directory nor a model file; give {_ACCEPTED}")


def _exported_run(path: Path) -> Run:
    """An exported model as a bare run. `--preprocess auto`: the input range export.json
    records beside it (raw 0..255 -> "none", [0, 1] -> "scale", [-1, 1] -> "unit"); without
    one, raw 0..255 pixels ("none", what models exported by cnnviz take), with a note."""
    from cnnviz.model.exported import RECORD, ExportedModel
    from cnnviz.model.inputs import value_range

    model = ExportedModel(path)
    recorded = model.recorded_range
    if recorded is None:
        return Run(model, None, None, preprocess="none", preprocess_note=(
            f"--preprocess auto: {path} has no {RECORD} from `cnnviz export` beside it, so "
            "image files are fed as raw 0..255 pixels (as models cnnviz exports take them); "
            "pass --preprocess scale, unit, caffe or torch if it was trained otherwise"))
    for mode in ("none", "scale", "unit"):
        if all(abs(a - b) <= 1e-6 for a, b in zip(value_range(mode), recorded)):
            return Run(model, None, None, preprocess=mode)
    return Run(model, None, None, preprocess="none", preprocess_note=(
        f"--preprocess auto: {path} takes inputs in [{recorded[0]:g}, {recorded[1]:g}] "
        f"({RECORD}), the range of no --preprocess mode; image files are fed as raw 0..255 "
        "pixels; pass --preprocess to choose"))


def require_keras(run: Run, command: str) -> None:
    """A CnnvizError in one line when `run` is an exported model: `command` needs gradients or
    layers, which only the .keras model has."""
    if is_exported(run.model):
        raise CnnvizError(run.model.refusal(command))
