"""Export a trained model with Keras's own `model.export`, then prove the file computes the same.

Formats: `savedmodel` (a TensorFlow SavedModel folder, `format="tf_saved_model"`), `tflite`
(LiteRT flatbuffer, `format="litert"`) and `onnx` (`format="onnx"`, through tf2onnx); and
`tflite-int8`, a full-integer TFLite model (int8 weights, activations, input and output) that
TensorFlow's `TFLiteConverter` calibrates on the run's training images. Each exported file is
loaded back with its own runtime (`cnnviz.model.exported.ExportedModel`: the LiteRT
interpreter from ai-edge-litert, onnxruntime, `tf.saved_model.load`) and run on real images
beside the .keras model: the largest absolute difference of their outputs is the round-trip
error, and the rank correlation of the two models' occlusion maps says how far an explanation
of the exported file moves from one of the .keras model.

The exported model is the Keras model as trained, so it takes the same input: a run trained by
cnnviz carries its preprocessing as its first layers (raw pixel values in), a model without them
takes what its training data was scaled to; export.json records which.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnviz._keras import all_layers
from cnnviz._quiet import quiet_stderr
from cnnviz.errors import CnnvizError, first_line


@dataclass(frozen=True)
class ExportFormat:
    """What one `--format` is: Keras's name for it, where it goes, what it needs."""

    keras_format: str
    file_name: str  # in the run's export/ folder
    packages: tuple[tuple[str, str], ...]  # (module to import, pip name): export and check
    quantize: str | None = None  # "int8": full-integer, by TFLiteConverter instead of Keras

    def missing(self) -> list[str]:
        return [pip for module, pip in self.packages if importlib.util.find_spec(module) is None]


FORMATS = {
    "savedmodel": ExportFormat("tf_saved_model", "savedmodel", ()),
    "tflite": ExportFormat("litert", "model.tflite", (("ai_edge_litert", "ai-edge-litert"),)),
    "onnx": ExportFormat("onnx", "model.onnx", (("onnx", "onnx"), ("tf2onnx", "tf2onnx"),
                                                 ("onnxruntime", "onnxruntime"))),
    "tflite-int8": ExportFormat("tf.lite.TFLiteConverter (full integer)", "model.int8.tflite",
                                (("ai_edge_litert", "ai-edge-litert"),), quantize="int8"),
}
# Float formats must reproduce the Keras outputs to this (the bar; measured ~1e-7).
TOLERANCE = 1e-4
# Occlusion maps of the exported file and the .keras model are compared on this many images.
OCCLUSION_IMAGES = 16
# A full-integer model is calibrated on this many training images.
REPRESENTATIVE_IMAGES = 200


def export_formats(formats: Sequence[str], quantize: str | None) -> list[str]:
    """`--format` names (each once) with `--quantize int8` applied: tflite becomes tflite-int8."""
    formats = list(dict.fromkeys(formats))
    if quantize is None:
        return formats
    if quantize != "int8" or "tflite" not in formats:
        raise CnnvizError(f"--quantize {quantize} is for --format tflite (int8 only); received "
                          f"--format {', '.join(formats)}")
    return [f"tflite-{quantize}" if name == "tflite" else name for name in formats]


def require_packages(format_name: str) -> None:
    """CnnvizError in one line when the format's optional packages are not installed."""
    wanted = FORMATS[format_name]
    missing = wanted.missing()
    if missing:
        needed = ", ".join(pip for _, pip in wanted.packages)
        raise CnnvizError(
            f"--format {format_name} needs the packages {needed} (missing: {', '.join(missing)}); "
            "install them with: pip install 'cnnviz[export]'")


def export_model(model, path: str | Path, format_name: str, *,
                 representative: np.ndarray | None = None) -> Path:
    """Write `model` to `path` in `format_name` with `model.export`; atomically.

    The file (or SavedModel folder) is written under a temporary name beside `path` and renamed
    into place, so an interrupted export never leaves a half-written model where the old one was.

    Args:
        model: a built Keras model.
        path: the file (.tflite, .onnx) or folder (savedmodel) to write.
        format_name: a key of `FORMATS`.
        representative: (N, H, W, C) float32 inputs a quantized format is calibrated on
            (`representative_images`); needed by tflite-int8 only.

    Returns:
        `path`.
    """
    if format_name not in FORMATS:
        raise CnnvizError(
            f"unknown export format {format_name!r}; choose from {', '.join(FORMATS)}")
    require_packages(format_name)
    if FORMATS[format_name].quantize and representative is None:
        raise CnnvizError(f"--format {format_name} needs representative images to calibrate on")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    written = staging / path.name
    _call_once(model)
    try:
        # The converters log pages of C++ and absl lines.
        with quiet_stderr(), _statistics_as_variables(model, format_name == "onnx"):
            if FORMATS[format_name].quantize:
                _convert_int8(model, written, representative)
            else:
                model.export(str(written), format=FORMATS[format_name].keras_format,
                             verbose=False)
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


def _convert_int8(model, written: Path, representative: np.ndarray) -> None:
    """Full-integer TFLite (int8 weights, activations, input and output) by TensorFlow's
    converter from the model's SavedModel, calibrated on `representative` one image at a time
    (TensorFlow's post-training integer quantization recipe)."""
    import tensorflow as tf

    saved = written.with_name(f"{written.name}.savedmodel")  # in the staging folder
    model.export(str(saved), format="tf_saved_model", verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    written.write_bytes(converter.convert())


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


# ---------------------------------------------------------------------- checking the files
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


def describe_outputs(model) -> list[dict]:
    """Each output's name, units and activation (softmax, sigmoid, linear), for export.json:
    an exported model reads what its outputs hold from it (`ExportedModel.output_activation`)."""
    from cnnviz.model.outputs import output_activation, output_names

    return [{"name": name, "units": int(model.outputs[index].shape[-1]),
             "activation": output_activation(model, index)}
            for index, name in enumerate(output_names(model))]


def check_images_for(run, count: int, split: str = "test") -> tuple[np.ndarray, str]:
    """Images to compare (or calibrate) the exported model on: the run's first images of
    `split` ("test", "train"), or (a bare .keras) seeded uniform noise over the input range the
    model expects."""
    if run.config is not None:
        part = getattr(run.dataset(), split)
        images = np.asarray(part.images(np.arange(min(count, len(part)))), np.float32)
        return images, f"the first {len(images)} {split} images"
    low, high = input_range_of(run.model)
    shape = tuple(int(size) for size in run.model.inputs[0].shape[1:])
    noise = np.random.default_rng(0).uniform(low, high, size=(min(count, 64), *shape))
    return noise.astype(np.float32), f"{len(noise)} uniform-noise images in [{low:g}, {high:g}]"


def check_export(model, path: Path, format_name: str, images: np.ndarray, described: str,
                 tolerance: float = TOLERANCE) -> tuple[dict, str]:
    """The exported file, read back by its runtime, against `model` on `images`.

    Float formats must reproduce the outputs within `tolerance`; a quantized one is not held to
    it (its outputs move by a quantization step) and reports how often the class agrees. Both
    get the occlusion maps' agreement on the first `OCCLUSION_IMAGES` (`occlusion_agreement`).

    Returns:
        (export.json's entries for the file, one line saying how it went).
    """
    from cnnviz.model.exported import ExportedModel

    exported = ExportedModel(path)
    difference = round_trip_difference(model, exported.run, images)
    entry = {"checked_on": described, "max_abs_difference": difference}
    line = f"max |{format_name} - keras| = {difference:.2e} on {described}"
    if FORMATS[format_name].quantize:
        agreeing = float(np.mean(exported.predict(images).argmax(axis=-1)
                                 == keras_outputs(model, images)[0].argmax(axis=-1)))
        entry |= {"quantized": FORMATS[format_name].quantize, "same_class": agreeing}
        line += f", the same class on {agreeing:.0%} (quantized: not held to --tolerance)"
    else:
        entry["matches"] = difference <= tolerance
        line += ": matches" if difference <= tolerance else f": DIFFERS (> {tolerance:g})"
    agreement = occlusion_agreement(model, exported, images[:OCCLUSION_IMAGES])
    entry |= agreement
    line += (f"; occlusion maps: rank correlation {agreement['occlusion_rank_correlation']:.4f}, "
             f"max |diff| {agreement['occlusion_max_abs_difference']:.1e} on "
             f"{agreement['occlusion_images']} images")
    return entry, line


def occlusion_agreement(model, exported, images: np.ndarray) -> dict:
    """How far the exported model's occlusion maps move from the Keras model's on `images`:
    `cnnviz occlusion`'s defaults, each image explained for the class the Keras model predicts
    (the first output of a multi-output model). The mean Spearman rank correlation of the maps
    over the images (`cnnviz.trust.sanity.rank_correlation`) and their largest |difference|."""
    from cnnviz.explain.occlusion import occlusion
    from cnnviz.trust.sanity import rank_correlation

    output = 0 if len(model.outputs) > 1 else None
    expected = occlusion(model, images, output=output)
    received = occlusion(exported, images, expected.targets, output=output)
    return {"occlusion_images": len(images),
            "occlusion_rank_correlation": float(np.mean(rank_correlation(
                expected.probability, received.probability))),
            "occlusion_max_abs_difference": float(np.max(np.abs(
                received.probability - expected.probability)))}


def representative_images(run) -> np.ndarray:
    """What a full-integer model is calibrated on: the run's first training images (a bare
    .keras file: uniform noise over its input range, `check_images_for`)."""
    return check_images_for(run, REPRESENTATIVE_IMAGES, "train")[0]


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
