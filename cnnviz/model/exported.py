"""Exported models (`.tflite`, `.onnx`, a SavedModel folder), run forward only by their runtimes.

`ExportedModel` holds what cnnviz's forward-only code reads of a Keras model, no more: `name`,
`inputs[0].shape` (None, H, W, C), `outputs[i].shape` (None, K), what each output holds
(`output_activation`), the input range, and `predict(images)`. The runtimes: LiteRT's
interpreter (ai-edge-litert) for .tflite, onnxruntime on the CPU for .onnx, and the serving
signature of `tf.saved_model.load` for a SavedModel folder. A quantized TFLite model (int8 or
uint8 input or output) gets its input quantized and its output dequantized with each tensor's
own scale and zero point, so it is fed and read in float like the others.

What a file does not say, the export.json that `cnnviz export` writes beside it does: the input
range the model takes (so `--preprocess auto` knows) and each output's activation. Without it,
inputs are taken to be raw 0..255 pixels (what every model cnnviz exports takes: its
preprocessing is inside, docs/decisions.md D1), and an output is a probability when its values
are (rows in [0, 1] summing to 1).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnviz._quiet import quiet_stderr
from cnnviz.errors import CnnvizError, first_line

SUFFIXES = {".tflite": "tflite", ".onnx": "onnx"}
RECORD = "export.json"  # written by `cnnviz export` beside the files it exports
# The runtime each format needs: (module to import, pip name).
RUNTIMES = {"tflite": ("ai_edge_litert", "ai-edge-litert"),
            "onnx": ("onnxruntime", "onnxruntime"), "savedmodel": ("tensorflow", "tensorflow")}
FORWARD_COMMANDS = "predict, evaluate, occlusion and rise"
# Uniform-noise images run to tell a probability output from logits when nothing records it.
_PROBES = 8


def exported_format(path: str | Path) -> str | None:
    """"tflite", "onnx", "savedmodel" (a folder with saved_model.pb and no model.keras), or None."""
    path = Path(path)
    if path.is_dir():
        saved = (path / "saved_model.pb").is_file() and not (path / "model.keras").is_file()
        return "savedmodel" if saved else None
    return SUFFIXES.get(path.suffix.lower())


def is_exported(model) -> bool:
    return isinstance(model, ExportedModel)


@dataclass(frozen=True)
class TensorInfo:
    """What cnnviz reads of a Keras tensor: its name, shape (None: any size) and dtype."""

    name: str
    shape: tuple
    dtype: str = "float32"
    scale: float = 0.0  # a quantized tensor's step (TFLite int8/uint8); 0.0 for a float one


class ExportedModel:
    """A model exported for inference, run forward only by the runtime of its format.

    Args:
        path: a .tflite or .onnx file, or a SavedModel folder.
        format_name: "tflite", "onnx" or "savedmodel"; None reads it from `path`.
    """

    def __init__(self, path: str | Path, format_name: str | None = None):
        path = Path(path)
        format_name = format_name or exported_format(path)
        if format_name not in RUNTIMES:
            raise CnnvizError(f"{path} is not an exported model: give a .tflite or .onnx file "
                              "or a SavedModel folder (saved_model.pb inside)")
        module, pip_name = RUNTIMES[format_name]
        if importlib.util.find_spec(module) is None:
            raise CnnvizError(f"reading {path} needs the package {pip_name}; install it with: "
                              "pip install 'cnnviz[export]'")
        self.path, self.format, self.name = path, format_name, path.name
        try:
            self._run, self.inputs, self.outputs = _LOADERS[format_name](str(path))
        except CnnvizError:
            raise
        except Exception as error:  # noqa: BLE001 - each runtime raises its own types
            raise CnnvizError(f"cannot load exported model {path} ({format_name}): "
                              f"{first_line(error)}") from None
        shapes = [tensor.shape for tensor in self.inputs]
        if len(shapes) != 1 or len(shapes[0]) != 4 or None in shapes[0][1:]:
            raise CnnvizError(f"{path} takes inputs of shapes {shapes}; cnnviz runs exported "
                              "models with one image input (N, H, W, C) of a fixed size")
        self.record = export_record(path)
        self._activations: dict[int, str] = {}

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.path)!r}, {self.format!r})"

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        """Every output for `images` (N, H, W, C) float32: [(N, K_i) float32], in order."""
        return self._run(np.ascontiguousarray(images, np.float32))

    def predict(self, images: np.ndarray, output: int = 0) -> np.ndarray:
        """Output `output` for `images` (N, H, W, C) float32: (N, K) float32."""
        return self.run(images)[output]

    @property
    def quantized(self) -> bool:
        """Whether an input or output is an integer tensor (full-integer TFLite)."""
        return any(tensor.scale for tensor in (*self.inputs, *self.outputs))

    @property
    def recorded_range(self) -> tuple[float, float] | None:
        """(low, high) of the inputs as export.json records them, or None."""
        recorded = (self.record or {}).get("input", {}).get("range")
        return None if recorded is None else tuple(float(value) for value in recorded)

    @property
    def input_range(self) -> tuple[float, float]:
        """(low, high) of the inputs: export.json's record, else raw 0..255 pixels."""
        return self.recorded_range or (0.0, 255.0)

    def output_activation(self, index: int = 0) -> str:
        """What output `index` holds: "softmax", "sigmoid" (probabilities) or "linear".

        export.json's record when it has one; else read from the values on a few seeded
        uniform-noise inputs: rows in [0, 1] summing to 1 are a softmax, one unit in [0, 1] a
        sigmoid (within the output's quantization step for a quantized model).
        """
        if index not in self._activations:
            recorded = (self.record or {}).get("outputs") or []
            if index < len(recorded) and recorded[index].get("activation"):
                self._activations[index] = str(recorded[index]["activation"])
            else:
                self._activations[index] = self._probed_activation(index)
        return self._activations[index]

    def _probed_activation(self, index: int) -> str:
        low, high = self.input_range
        shape = (_PROBES, *self.inputs[0].shape[1:])
        values = self.predict(np.random.default_rng(0).uniform(low, high, shape), index)
        # A quantized output is exact to one step of its scale.
        tolerance = 1e-3 + values.shape[-1] * self.outputs[index].scale
        in_unit = values.min() >= -tolerance and values.max() <= 1 + tolerance
        if values.shape[-1] == 1:
            return "sigmoid" if in_unit else "linear"
        sums_to_one = bool(np.all(np.abs(values.sum(axis=-1) - 1) <= tolerance))
        return "softmax" if in_unit and sums_to_one else "linear"

    def refusal(self, command: str) -> str:
        """The one line for a command that needs gradients or layers, which this model lacks."""
        return (f"{self.path} is an exported model ({self.format}): only {FORWARD_COMMANDS} run "
                f"on it (they need forward passes only); give the .keras file for {command}")


def export_record(path: str | Path) -> dict | None:
    """The export.json `cnnviz export` wrote beside `path`, when it lists that file; else None."""
    path = Path(path)
    record_file = path.parent / RECORD
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CnnvizError(f"{record_file} is damaged ({error}); export the model again, or "
                          f"delete it to read {path.name} without it") from None
    formats = record.get("formats") if isinstance(record, dict) else None
    listed = [entry for entry in (formats or {}).values()
              if isinstance(entry, dict) and Path(str(entry.get("path", ""))).name == path.name]
    return record if listed else None


# ------------------------------------------------------------------------------ runtimes
def _dimensions(shape) -> tuple:
    """A runtime's shape as a Keras one: unknown sizes (-1, a name, None) become None."""
    return tuple(int(size) if isinstance(size, (int, np.integer)) and size >= 0 else None
                 for size in shape)


def _tflite(path: str):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    held = {"interpreter": Interpreter(model_path=path), "shape": None, "fixed": None,
            "delegates": True}
    inputs = held["interpreter"].get_input_details()
    outputs = held["interpreter"].get_output_details()
    tensor = inputs[0]

    def allocate(shape) -> None:
        interpreter = held["interpreter"]
        interpreter.resize_tensor_input(tensor["index"], shape)
        with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            interpreter.allocate_tensors()
        held["shape"] = tuple(shape)

    def prepare(shape) -> None:
        """Allocate for a batch of `shape`: with XNNPACK (LiteRT's default CPU delegate), else
        with the built-in kernels (XNNPACK refuses some quantized graphs), else at the model's
        own batch size (a graph that cannot be resized)."""
        try:
            return allocate(shape)
        except (RuntimeError, ValueError):
            if held["delegates"]:
                held["interpreter"] = Interpreter(
                    model_path=path,
                    experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
                held["delegates"] = False
                return prepare(shape)
        held["fixed"] = int(tensor["shape"][0])
        allocate(tuple(tensor["shape"]))

    def invoke(images):
        interpreter = held["interpreter"]
        interpreter.set_tensor(tensor["index"], _quantized(images, tensor))
        interpreter.invoke()
        return [_dequantized(interpreter.get_tensor(output["index"]), output)
                for output in outputs]

    def run(images):
        if held["fixed"] is None and images.shape != held["shape"]:
            prepare(images.shape)
        if held["fixed"] is not None:
            return _in_fixed_batches(invoke, images, held["fixed"])
        return invoke(images)

    def info(detail):
        signature = detail.get("shape_signature")
        shape = _dimensions(signature if signature is not None and len(signature) else
                            detail["shape"])
        return TensorInfo(detail["name"], (None, *shape[1:]), np.dtype(detail["dtype"]).name,
                          float(detail["quantization"][0]))

    return run, [info(detail) for detail in inputs], [info(detail) for detail in outputs]


def _in_fixed_batches(invoke, images: np.ndarray, size: int) -> list[np.ndarray]:
    """`invoke` over chunks of exactly `size` images (the last one padded), joined."""
    parts = []
    for start in range(0, len(images), size):
        chunk = images[start:start + size]
        padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]),
                                                 chunk.dtype)])
        parts.append([output[:len(chunk)] for output in invoke(padded)])
    return [np.concatenate(outputs) for outputs in zip(*parts)]


def _quantized(images: np.ndarray, detail: dict) -> np.ndarray:
    """Float inputs as the tensor takes them: q = round(x / scale) + zero point, clipped."""
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if not np.issubdtype(dtype, np.integer) or not scale:
        return images.astype(dtype, copy=False)
    limits = np.iinfo(dtype)
    return np.clip(np.round(images / scale) + zero_point, limits.min, limits.max).astype(dtype)


def _dequantized(values: np.ndarray, detail: dict) -> np.ndarray:
    """An output as float32: (q - zero point) * scale for a quantized one."""
    scale, zero_point = detail["quantization"]
    if np.issubdtype(values.dtype, np.integer) and scale:
        return ((values.astype(np.float32) - zero_point) * np.float32(scale)).astype(np.float32)
    return values.astype(np.float32)


def _onnx(path: str):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(images):
        return [np.asarray(output, np.float32) for output in session.run(None, {name: images})]

    def info(tensor):
        return TensorInfo(tensor.name, (None, *_dimensions(tensor.shape)[1:]), tensor.type)

    return run, [info(t) for t in session.get_inputs()], [info(t) for t in session.get_outputs()]


def _savedmodel(path: str):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    if "serving_default" not in loaded.signatures:
        raise CnnvizError(f"SavedModel {path} has no serving_default signature (it has "
                          f"{', '.join(loaded.signatures) or 'none'}); export it with one")
    serve = loaded.signatures["serving_default"]
    specs = serve.structured_input_signature[1]
    outputs = serve.structured_outputs
    keys = sorted(outputs)
    input_name = next(iter(specs))

    def run(images):
        found = serve(**{input_name: tf.constant(images)})
        return [np.asarray(found[key], np.float32) for key in keys]

    run.loaded = loaded  # the signature needs the loaded object's variables alive

    def info(name, spec):
        return TensorInfo(name, (None, *_dimensions(spec.shape.as_list())[1:]), spec.dtype.name)

    return (run, [info(name, spec) for name, spec in specs.items()],
            [info(key, outputs[key]) for key in keys])


_LOADERS = {"tflite": _tflite, "onnx": _onnx, "savedmodel": _savedmodel}
