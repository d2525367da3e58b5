"""A plain-numpy forward pass of the layers cnnviz builds, and `verify`: does Keras compute it too?

Every layer is recomputed in float64 from nothing but `layer.get_config()` and
`layer.get_weights()` (no TensorFlow op), then compared with Keras's own output of that layer.
This is the "trust" check under every picture cnnviz draws: if the numbers a picture is built on
can be recomputed by hand, the picture shows the model and not an artefact.

Conventions followed exactly as TensorFlow/Keras define them:

* Conv2D is cross-correlation (the kernel is not flipped); `padding="same"` pads
  `max((out - 1) * stride + window - size, 0)` cells, the smaller half before and the larger half
  after (TF's asymmetric SAME padding when `stride > 1`). Dilation and groups are supported
  (TF forbids dilation together with strides > 1).
* Max pooling pads with -inf; average pooling with `padding="same"` averages over the cells inside
  the image only (the padded cells are not counted).
* Flatten is row-major over (H, W, C), channels last.
* Rescaling is `x * scale + offset`; Normalization is `(x - mean) / max(sqrt(variance), 1e-7)`
  (a model's own preprocessing layers, docs/decisions.md D1).
* BatchNormalization at inference: `(x - moving_mean) / sqrt(moving_variance + epsilon) * gamma
  + beta`; Dropout and the noise layers are the identity at inference.
* The string activation `"leaky_relu"` has slope 0.2 (keras.activations.leaky_relu); the
  `LeakyReLU` layer's default is 0.3; both are read from the config.

Only `channels_last` is supported. A layer that cannot be recomputed is reported (never skipped):
its trace says `supported=False` with the reason, and Keras's own output of it is fed to the next
layer so that the rest of the model is still checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.model.inputs import as_image_batch
from cnnviz.trust.reference.activations import Unsupported
from cnnviz.trust.reference.layers import compute_layer

__all__ = [
    "LayerTrace",
    "VerifyReport",
    "VerifyRow",
    "reference_forward",
    "verify",
]
# explain_steps prints matrices up to this side and vectors up to this length, else a summary.
PRINTED_SIDE = 12
PRINTED_LENGTH = 64


@dataclass(frozen=True)
class LayerTrace:
    """One layer of the numpy forward pass.

    Attributes:
        name: the Keras layer name.
        class_name: the Keras layer class, e.g. "Conv2D".
        output: the numpy output, float64, shape (N, ...) like the layer's output; None when the
            layer could not be recomputed (`supported` False).
        supported: False when the layer was not recomputed; the pass continued from Keras's own
            output of this layer.
        reason: why the layer is unsupported ("" when supported).
    """

    name: str
    class_name: str
    output: np.ndarray | None
    supported: bool = True
    reason: str = ""


@dataclass(frozen=True)
class VerifyRow:
    """One row of a verify report: one layer, numpy vs Keras.

    Attributes:
        name, class_name: the layer.
        output_shape: the layer's output shape for one image (batch axis left out).
        max_difference: max |numpy - keras| over the batch; NaN when unsupported.
        ok: supported and `max_difference <= tolerance`.
        reason: why the layer is unsupported ("" otherwise).
    """

    name: str
    class_name: str
    output_shape: tuple[int, ...]
    max_difference: float
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class VerifyReport:
    """numpy vs Keras, layer by layer, on `image_count` images."""

    rows: tuple[VerifyRow, ...]
    tolerance: float
    image_count: int

    @property
    def ok(self) -> bool:
        """True when every layer was recomputed and matched Keras within `tolerance`."""
        return all(row.ok for row in self.rows)

    @property
    def max_difference(self) -> float:
        """The largest difference over the recomputed layers (0.0 when none was recomputed)."""
        checked = [row.max_difference for row in self.rows if not row.reason]
        return max(checked, default=0.0)

    @property
    def unsupported(self) -> tuple[str, ...]:
        """Names of the layers that could not be recomputed."""
        return tuple(row.name for row in self.rows if row.reason)


# ---------------------------------------------------------------------------- model plumbing
def linear_layers(model) -> list:
    """The model's layers in order (InputLayer left out); a CnnvizError unless it is a chain
    (what `explain_steps` can write out step by step)."""
    if not getattr(model, "built", False) or not getattr(model, "inputs", None):
        raise CnnvizError(
            f"model {model.name!r} has no defined input; build it with keras.Input(shape=...) first"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise CnnvizError(
            f"reference forward pass needs one input and one output; model {model.name!r} has "
            f"{len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    if not layers:
        raise CnnvizError(f"model {model.name!r} has no layers to recompute")
    import keras

    if isinstance(model, keras.Sequential):
        # A chain by construction; a reloaded one has extra inbound nodes from deserialization.
        return layers
    expected = model.inputs[0]
    for layer in layers:
        # `layer.input` is the layer's first call: the model's own graph (the copies cnnviz
        # explains through call the same layers again, on other inputs).
        inbound = layer.input if getattr(layer, "_inbound_nodes", None) else None
        if inbound is not expected:
            raise CnnvizError(
                f"explain_steps writes out a chain of layers (Sequential or a linear functional "
                f"model); layer {layer.name!r} does not take exactly the previous layer's "
                f"output. `verify` checks graphs with skip connections and merges"
            )
        expected = layer.output
    if expected is not model.outputs[0]:
        raise CnnvizError(f"model {model.name!r}: the last layer's output is not the model output")
    return layers


def model_batch(model, images) -> np.ndarray:
    """`images` as float32 (N, H, W, C), checked against the model's input shape."""
    batch = as_image_batch(images)
    expected = tuple(model.inputs[0].shape[1:])
    if len(expected) != 3 or any(
        want is not None and want != got for want, got in zip(expected, batch.shape[1:])
    ):
        raise CnnvizError(
            f"images of shape {batch.shape[1:]} do not fit model {model.name!r}, which expects "
            f"(H, W, C) = {expected}"
        )
    return batch


def _single_input(model) -> None:
    if not getattr(model, "built", False) or not getattr(model, "inputs", None):
        raise CnnvizError(
            f"model {model.name!r} has no defined input; build it with keras.Input(shape=...) first"
        )
    if len(model.inputs) != 1:
        raise CnnvizError(
            f"reference forward pass needs one input; model {model.name!r} has "
            f"{len(model.inputs)} inputs"
        )


def keras_layer_outputs(model, batch: np.ndarray, batch_size: int = 256,
                   paths: list[str] | None = None) -> dict:
    """Keras's own output of every leaf layer path (or of `paths`), float64, from one compiled
    batched call per chunk of a flat copy of the model (nested models opened; the user's
    layers, not copies)."""
    import keras

    from cnnviz import backend
    from cnnviz.model.graph import is_nested_model, layer_entries, rebuild

    rebuilt = rebuild(model, output=None)
    if paths is None:
        nested = {entry.path for entry in layer_entries(model) if is_nested_model(entry.layer)}
        paths = [path for path in rebuilt.tensors if path not in nested]
    probe = keras.Model(rebuilt.model.inputs[0], [rebuilt.tensors[path] for path in paths])
    run = backend.compile(lambda x: tuple(keras.tree.flatten(probe(x, training=False))),
                          probe.variables)
    chunk = min(batch_size, len(batch))
    pieces: list[list[np.ndarray]] = [[] for _ in paths]
    for start in range(0, len(batch), chunk):
        part = batch[start:start + chunk]
        real = len(part)
        if real < chunk:  # pad the last chunk to the traced shape instead of retracing
            part = np.concatenate([part, np.zeros((chunk - real, *part.shape[1:]), part.dtype)])
        outputs = run(part)
        for index, output in enumerate(outputs):
            pieces[index].append(np.asarray(output, np.float64)[:real])
    return {path: np.concatenate(parts, axis=0) for path, parts in zip(paths, pieces)}


def _walk_numpy(model, batch: np.ndarray, keras_outputs: Callable[[], dict]) -> list[LayerTrace]:
    """Run the model's graph in numpy, nested models opened, merges (Add, Concatenate, ...)
    fed their inputs; an unsupported layer continues from Keras's own output of it."""
    from cnnviz.model.graph import walk

    traces: list[LayerTrace] = []

    def call_leaf(path, layer, args, kwargs):
        class_name = type(layer).__name__
        x = args[0] if args else None
        try:
            out = compute_layer(layer, x)
            traces.append(LayerTrace(path, class_name, out))
            return out
        except Unsupported as unsupported:
            reason = str(unsupported)
        # A config this pass does not understand is reported like a missing layer type.
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
            reason = f"numpy pass failed: {type(error).__name__}: {error}"
        traces.append(LayerTrace(path, class_name, None, False, reason))
        return keras_outputs()[path]

    walk(model, [batch.astype(np.float64)], call_leaf)
    return traces


def reference_forward(model, images) -> list[LayerTrace]:
    """Recompute the model layer by layer in plain numpy (float64).

    Args:
        model: a built Keras model with one input, channels_last: Sequential or functional,
            branches and merges (Add, Concatenate, ...) and nested models included.
        images: float array (N, H, W, C), or one image (H, W, C).

    Returns:
        One LayerTrace per layer (InputLayer left out; a nested model's layers by path), in the
        order the graph runs them. `output` has the layer's output shape with the batch axis
        first. An unsupported layer has `supported=False`, a reason, `output=None`, and Keras's
        own output of it feeds the layers after it.

    Raises:
        CnnvizError: the model has several inputs, or the images do not fit its input.
    """
    _single_input(model)
    batch = model_batch(model, images)
    cache: list = []

    def keras_outputs() -> dict:
        if not cache:
            cache.append(keras_layer_outputs(model, batch))
        return cache[0]

    return _walk_numpy(model, batch, keras_outputs)


def verify(model, images, *, tolerance: float = 1e-4, batch_size: int = 256) -> VerifyReport:
    """Compare every layer's numpy output with Keras's own output of that layer.

    Keras's outputs come from one compiled model returning every layer's output (chunked by
    `batch_size`); the numpy pass runs on its own numbers from the input on, so a difference
    anywhere shows up in that layer's row and the rows after it. Graphs with branches, merges
    (Add, Concatenate, Multiply, ...) and nested models are walked in the order they run.

    Args:
        model: a built Keras model with one input (see `reference_forward`).
        images: float array (N, H, W, C), or one image (H, W, C).
        tolerance: largest accepted max |numpy - keras| per layer (absolute, float32 Keras vs
            float64 numpy). Must be >= 0.
        batch_size: images per Keras call.

    Returns:
        A VerifyReport: one row per layer; `report.ok` is False if any layer differs by more than
        `tolerance` or could not be recomputed (its row says which and why).
    """
    if not tolerance >= 0:
        raise CnnvizError(f"tolerance must be >= 0; received tolerance={tolerance!r}")
    _single_input(model)
    batch = model_batch(model, images)
    expected = keras_layer_outputs(model, batch, batch_size)
    traces = _walk_numpy(model, batch, lambda: expected)
    rows = []
    for trace in traces:
        keras_output = expected[trace.name]
        shape = tuple(int(size) for size in keras_output.shape[1:])
        if not trace.supported:
            rows.append(VerifyRow(trace.name, trace.class_name, shape, math.nan, False,
                                  trace.reason))
            continue
        if trace.output.shape != keras_output.shape:  # a wrong reference, not a rounding error
            rows.append(VerifyRow(trace.name, trace.class_name, shape, math.inf, False))
            continue
        difference = float(np.max(np.abs(trace.output - keras_output), initial=0.0))
        rows.append(VerifyRow(trace.name, trace.class_name, shape, difference,
                              bool(difference <= tolerance)))
    return VerifyReport(tuple(rows), float(tolerance), len(batch))
