"""Export a trained model with Keras's own `model.export`, then prove the file computes the same.

Formats: `savedmodel` (a TensorFlow SavedModel folder, `format="tf_saved_model"`), `tflite`
(LiteRT flatbuffer, `format="litert"`) and `onnx` (`format="onnx"`, through tf2onnx). Each
exported file is loaded back with its own runtime (`tf.saved_model.load`, the LiteRT
interpreter from ai-edge-litert, onnxruntime) and run on real images beside the .keras model:
the largest absolute difference of their outputs is the round-trip error.

The exported model is the Keras model as trained, so it takes the same input: a run trained by
cnnviz carries its preprocessing as its first layers (raw pixel values in), a model without them
takes what its training data was scaled to; export.json records which.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnviz._keras import all_layers
from cnnviz.errors import CnnvizError, first_line


@dataclass(frozen=True)
class ExportFormat:
    """What one `--format` is: Keras's name for it, where it goes, what it needs."""

    keras_format: str
    file_name: str  # in the run's export/ folder
    packages: tuple[tuple[str, str], ...]  # (module to import, pip name): export and check

    def missing(self) -> list[str]:
        return [pip for module, pip in self.packages if importlib.util.find_spec(module) is None]


FORMATS = {
    "savedmodel": ExportFormat("tf_saved_model", "savedmodel", ()),
    "tflite": ExportFormat("litert", "model.tflite", (("ai_edge_litert", "ai-edge-litert"),)),
    "onnx": ExportFormat("onnx", "model.onnx", (("onnx", "onnx"), ("tf2onnx", "tf2onnx"),
                                                 ("onnxruntime", "onnxruntime"))),
}
# Float formats must reproduce the Keras outputs to this (the bar; measured ~1e-7).
TOLERANCE = 1e-4


def require_packages(format_name: str) -> None:
    """CnnvizError in one line when the format's optional packages are not installed."""
    wanted = FORMATS[format_name]
    missing = wanted.missing()
    if missing:
        needed = ", ".join(pip for _, pip in wanted.packages)
        raise CnnvizError(
            f"--format {format_name} needs the packages {needed} (missing: {', '.join(missing)}); "
            "install them with: pip install 'cnnviz[export]'")


def export_model(model, path: str | Path, format_name: str) -> Path:
    """Write `model` to `path` in `format_name` with `model.export`; atomically.

    The file (or SavedModel folder) is written under a temporary name beside `path` and renamed
    into place, so an interrupted export never leaves a half-written model where the old one was.

    Args:
        model: a built Keras model.
        path: the file (.tflite, .onnx) or folder (savedmodel) to write.
        format_name: a key of `FORMATS`.

    Returns:
        `path`.
    """
    if format_name not in FORMATS:
        raise CnnvizError(
            f"unknown export format {format_name!r}; choose from {', '.join(FORMATS)}")
    require_packages(format_name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    written = staging / path.name
    _call_once(model)
    try:
        # The converters log pages of C++ and absl lines.
        with _quiet_stderr(), _statistics_as_variables(model, format_name == "onnx"):
            model.export(str(written), format=FORMATS[format_name].keras_format, verbose=False)
        _replace(written, path)
    except CnnvizError:
        raise
    except Exception as error:  # noqa: BLE001 - converters raise anything; say which format
        raise CnnvizError(f"exporting {model.name!r} as {format_name} failed: "
                          f"{type(error).__name__}: {first_line(error, limit=1000)}"
                          ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


@contextlib.contextmanager
def _statistics_as_variables(model, active: bool):
    """For the ONNX converter: a Normalization layer given its mean and variance keeps them as
    plain tensors, which tf2onnx turns into extra graph inputs instead of constants (the
    exported model would then need them fed). While exporting, they are variables (frozen
    into the graph as initializers); the layer is restored afterwards."""
    swapped = []
    if active:
        import tensorflow as tf

        for layer in all_layers(model):
            if type(layer).__name__ == "Normalization" and getattr(layer, "input_mean", None) \
                    is not None and getattr(layer, "mean", None) is not None:
                swapped.append((layer, layer.mean, layer.variance))
                # object.__setattr__: Keras would otherwise track the variables as new weights.
                object.__setattr__(layer, "mean", tf.Variable(layer.mean, trainable=False))
                object.__setattr__(layer, "variance", tf.Variable(layer.variance, trainable=False))
    try:
        yield
    finally:
        for layer, mean, variance in swapped:
            object.__setattr__(layer, "mean", mean)
            object.__setattr__(layer, "variance", variance)


def _call_once(model) -> None:
    """Keras's ONNX export refuses a model never called (e.g. one just loaded from .keras)."""
    if getattr(model, "_called", True):
        return
    shapes = [[1 if size is None else int(size) for size in tensor.shape]
              for tensor in model.inputs]
    model([np.zeros(shape, np.float32) for shape in shapes] if len(shapes) > 1
          else np.zeros(shapes[0], np.float32), training=False)


def _replace(source: Path, target: Path) -> None:
    """Rename `source` onto `target` (a file or a folder); an old folder is moved aside first."""
    if source.is_dir() and target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


class _quiet_stderr:
    """File descriptor 2 to /dev/null for the duration (C++ logging bypasses sys.stderr)."""

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        return False


# ---------------------------------------------------------------------------- loading back
def load_exported(path: str | Path, format_name: str) -> Callable[[np.ndarray], list[np.ndarray]]:
    """The exported model as a function of a float32 batch, run by the format's own runtime.

    Returns:
        predict(images (N, H, W, C) float32) -> [output (N, ...)] per model output, in order.
    """
    require_packages(format_name)
    path = str(path)
    if format_name == "savedmodel":
        import tensorflow as tf

        serve = tf.saved_model.load(path).signatures["serving_default"]
        (input_name,) = serve.structured_input_signature[1]

        def predict(images):
            outputs = serve(**{input_name: tf.constant(images)})
            return [np.asarray(outputs[key]) for key in sorted(outputs)]

        return predict
    if format_name == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path)
        (tensor,) = interpreter.get_input_details()

        def predict(images):
            interpreter.resize_tensor_input(tensor["index"], images.shape)
            with _quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                interpreter.allocate_tensors()
            interpreter.set_tensor(tensor["index"], images)
            interpreter.invoke()
            return [interpreter.get_tensor(output["index"]).copy()
                    for output in interpreter.get_output_details()]

        return predict
    if format_name == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        (tensor,) = session.get_inputs()
        return lambda images: session.run(None, {tensor.name: images})
    raise CnnvizError(f"unknown export format {format_name!r}; choose from {', '.join(FORMATS)}")


def keras_outputs(model, images: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """The .keras model's own outputs (every output, in order) for `images`."""
    outputs = model.predict(images, batch_size=batch_size, verbose=0)
    return [np.asarray(output) for output in (outputs if isinstance(outputs, list) else [outputs])]


def round_trip_difference(model, predict: Callable, images: np.ndarray,
                          batch_size: int = 64) -> float:
    """max |exported - keras| over every output of `images` (run in batches)."""
    expected = keras_outputs(model, images)
    worst = 0.0
    for start in range(0, len(images), batch_size):
        received = predict(np.ascontiguousarray(images[start:start + batch_size], np.float32))
        if len(received) != len(expected):
            raise CnnvizError(f"the exported model has {len(received)} outputs; the Keras model "
                              f"{len(expected)}")
        for mine, theirs in zip(received, expected):
            part = theirs[start:start + batch_size]
            worst = max(worst, float(np.max(np.abs(np.asarray(mine).reshape(part.shape) - part))))
    return worst


def describe_input(model, input_range: tuple[float, float] | None) -> dict:
    """What the exported model expects, for export.json."""
    tensor = model.inputs[0]
    shape = [None if size is None else int(size) for size in tensor.shape]
    first = [type(layer).__name__ for layer in model.layers[:3]]
    described = {"name": tensor.name, "shape": shape, "dtype": str(tensor.dtype),
                 "first_layers": first}
    if input_range is not None:
        described["range"] = list(input_range)
    return described


def check_images_for(run, count: int) -> tuple[np.ndarray, str]:
    """Images to compare the exported model on: the run's first test images, or (a bare .keras)
    seeded uniform noise over the input range the model expects."""
    if run.config is not None:
        test = run.dataset().test
        images = np.asarray(test.images(np.arange(min(count, len(test)))), np.float32)
        return images, f"the first {len(images)} test images"
    low, high = input_range_of(run.model)
    shape = tuple(int(size) for size in run.model.inputs[0].shape[1:])
    noise = np.random.default_rng(0).uniform(low, high, size=(min(count, 64), *shape))
    return noise.astype(np.float32), f"{len(noise)} uniform-noise images in [{low:g}, {high:g}]"


def input_range_of(model) -> tuple[float, float]:
    """The model's input range (docs/decisions.md D1: (0, 255) for models that start with
    preprocessing layers)."""
    from cnnviz.model.inputs import input_range

    return tuple(float(value) for value in input_range(model))


def export_paths(source: Path, run_directory: Path | None, formats: Sequence[str],
                 out: Path | None) -> dict[str, Path]:
    """Where each format goes: `out` (one format) or `out/<file>` (several), else RUN/export/."""
    if out is not None and len(formats) == 1 and (out.suffix or formats[0] == "savedmodel"):
        return {formats[0]: out}
    folder = out or (run_directory / "export" if run_directory is not None
                     else source.parent / f"{source.stem}_export")
    return {name: folder / FORMATS[name].file_name for name in formats}
