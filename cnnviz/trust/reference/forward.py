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
  (a model's own preprocessing layers, DECISIONS D1).
* BatchNormalization at inference: `(x - moving_mean) / sqrt(moving_variance + epsilon) * gamma
  + beta`; Dropout and the noise layers are the identity at inference.
* The string activation `"leaky_relu"` has slope 0.2 (keras.activations.leaky_relu); the
  `LeakyReLU` layer's default is 0.3; both are read from the config.

Only `channels_last` is supported. A layer that cannot be recomputed is reported (never skipped):
its trace says `supported=False` with the reason, and Keras's own output of it is fed to the next
layer so that the rest of the model is still checked.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnnviz.errors import CnnvizError
from cnnviz.model.outputs import as_image_batch

__all__ = [
    "LayerTrace",
    "VerifyReport",
    "VerifyRow",
    "explain_steps",
    "format_table",
    "reference_forward",
    "verify",
]

# Patches of one conv chunk are materialised; keep a chunk under ~64 MB of float64.
_PATCH_BYTES = 64 * 2**20
# explain_steps prints matrices up to this side and vectors up to this length, else a summary.
_PRINTED_SIDE = 12
_PRINTED_LENGTH = 64


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


class _Unsupported(Exception):
    """A layer (or option of one) the numpy pass does not recompute; the message says why."""


# ------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class _Activation:
    """An elementwise (or softmax) function with the formula a person would write down."""

    name: str
    formula: str
    function: Callable[[np.ndarray], np.ndarray]
    elementwise: bool = True


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of -|x| only, so large |x| neither overflows nor warns.
    small = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + small), small / (1.0 + small))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def _softmax(x: np.ndarray, axis: int | tuple[int, ...] = -1) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    exps = np.exp(shifted)
    return exps / np.sum(exps, axis=axis, keepdims=True)


def _elu(x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


def _gelu(x: np.ndarray, approximate: bool = False) -> np.ndarray:
    if approximate:
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
        return 0.5 * x * (1.0 + np.tanh(inner))
    from scipy.special import erf  # numpy has no erf; scipy's is plain C, no TF

    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _keras_relu(
    x: np.ndarray, negative_slope: float = 0.0, max_value: float | None = None,
    threshold: float = 0.0,
) -> np.ndarray:
    """keras.activations.relu, branch for branch (ReLU layer semantics)."""
    if negative_slope != 0.0 and max_value is None and threshold == 0.0:
        return np.where(x >= 0, x, negative_slope * x)
    negative_part = np.maximum(threshold - x, 0.0)
    if threshold != 0.0:
        out = np.where(x > threshold, x, 0.0)
    else:
        out = np.maximum(x, 0.0)
    if max_value is not None:
        out = np.clip(out, 0.0, max_value)
    if negative_slope != 0.0:
        out = out - negative_slope * negative_part
    return out


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


_STRING_ACTIVATIONS: dict[str, _Activation] = {
    activation.name: activation
    for activation in (
        _Activation("linear", "x", lambda x: x),
        _Activation("relu", "max(0, x)", lambda x: np.maximum(x, 0.0)),
        _Activation(
            "leaky_relu", "x if x >= 0 else 0.2*x", lambda x: np.where(x >= 0, x, 0.2 * x)
        ),
        _Activation("relu6", "min(max(0, x), 6)", _relu6),
        _Activation("tanh", "tanh(x)", np.tanh),
        _Activation("sigmoid", "1 / (1 + exp(-x))", _sigmoid),
        _Activation("softmax", "exp(z_k) / sum_j exp(z_j)", _softmax, elementwise=False),
        _Activation("log_softmax", "z_k - log(sum_j exp(z_j))",
                    lambda x: np.log(_softmax(x)), elementwise=False),
        _Activation("elu", "x if x > 0 else exp(x) - 1", _elu),
        _Activation(
            "selu", f"{_SELU_SCALE:.4f} * (x if x > 0 else {_SELU_ALPHA:.4f}*(exp(x) - 1))",
            lambda x: _SELU_SCALE * _elu(x, _SELU_ALPHA),
        ),
        _Activation("silu", "x * sigmoid(x)", lambda x: x * _sigmoid(x)),
        _Activation("swish", "x * sigmoid(x)", lambda x: x * _sigmoid(x)),
        _Activation("gelu", "x * Phi(x) (normal CDF)", _gelu),
        _Activation("softplus", "log(1 + exp(x))", _softplus),
        _Activation("softsign", "x / (1 + |x|)", lambda x: x / (1.0 + np.abs(x))),
        _Activation("mish", "x * tanh(softplus(x))", lambda x: x * np.tanh(_softplus(x))),
        _Activation("exponential", "exp(x)", np.exp),
        _Activation("hard_sigmoid", "relu6(x + 3) / 6", lambda x: _relu6(x + 3.0) / 6.0),
        _Activation("hard_silu", "x * relu6(x + 3) / 6", lambda x: x * _relu6(x + 3.0) / 6.0),
        _Activation("hard_swish", "x * relu6(x + 3) / 6", lambda x: x * _relu6(x + 3.0) / 6.0),
    )
}


def _layer_activation(class_name: str, config: dict) -> _Activation:
    """The activation an activation *layer* (ReLU, LeakyReLU, ...) computes, from its config."""
    if class_name == "ReLU":
        slope, top, threshold = (
            float(config.get("negative_slope", 0.0)),
            config.get("max_value"),
            float(config.get("threshold", 0.0)),
        )
        top = None if top is None else float(top)
        formula = "max(0, x)" if (slope, top, threshold) == (0.0, None, 0.0) else (
            f"relu(x, negative_slope={slope:g}, max_value={top}, threshold={threshold:g})"
        )
        return _Activation(
            "relu", formula, lambda x: _keras_relu(x, slope, top, threshold)
        )
    if class_name == "LeakyReLU":
        slope = float(config["negative_slope"])
        return _Activation(
            "leaky_relu", f"x if x >= 0 else {slope:g}*x", lambda x: np.where(x >= 0, x, slope * x)
        )
    if class_name == "ELU":
        alpha = float(config.get("alpha", 1.0))
        return _Activation("elu", f"x if x > 0 else {alpha:g}*(exp(x) - 1)",
                           lambda x: _elu(x, alpha))
    if class_name == "Softmax":
        axis = config.get("axis", -1)
        axis = tuple(axis) if isinstance(axis, (list, tuple)) else int(axis)
        return _Activation("softmax", "exp(z_k) / sum_j exp(z_j)",
                           lambda x: _softmax(x, axis), elementwise=False)
    raise _Unsupported(f"activation layer {class_name}")


def _resolve_activation(spec) -> _Activation:
    """An activation from a layer config's `activation` entry (a name or a serialized layer)."""
    if spec is None:
        return _STRING_ACTIVATIONS["linear"]
    if isinstance(spec, str):
        if spec not in _STRING_ACTIVATIONS:
            raise _Unsupported(f"activation {spec!r}")
        return _STRING_ACTIVATIONS[spec]
    if isinstance(spec, dict):
        class_name, inner = spec.get("class_name"), spec.get("config")
        if spec.get("module") == "keras.layers" and isinstance(inner, dict):
            return _layer_activation(class_name, inner)
        if class_name == "function" and isinstance(inner, str):
            return _resolve_activation(inner)
    raise _Unsupported(f"activation {spec!r}")


# ------------------------------------------------------------------------- windows and layers
def _same_padding(size: int, window: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF's SAME padding of one axis: (before, after); the extra cell goes after."""
    effective = (window - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _window_origins(
    size: int, window: int, stride: int, padding: str, dilation: int = 1
) -> list[int]:
    """Where each output's window starts in the *unpadded* input (negative = in the padding)."""
    effective = (window - 1) * dilation + 1
    if padding == "same":
        before = _same_padding(size, window, stride, dilation)[0]
        count = -(-size // stride)
    else:
        before, count = 0, (size - effective) // stride + 1
    return [index * stride - before for index in range(count)]


def _windows(
    x: np.ndarray, window: tuple[int, int], strides: tuple[int, int], padding: str,
    dilation: tuple[int, int] = (1, 1), fill: float = 0.0,
) -> np.ndarray:
    """All windows of x (N, H, W, C) as a view (N, OH, OW, C, kh, kw), padded the TF way."""
    (kh, kw), (sh, sw), (dh, dw) = window, strides, dilation
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "same":
        pads = [(0, 0), _same_padding(x.shape[1], kh, sh, dh),
                _same_padding(x.shape[2], kw, sw, dw), (0, 0)]
        x = np.pad(x, pads, constant_values=fill)
    elif padding != "valid":
        raise _Unsupported(f"padding {padding!r}")
    if x.shape[1] < eh or x.shape[2] < ew:
        raise _Unsupported(f"window {eh}x{ew} larger than the input {x.shape[1]}x{x.shape[2]}")
    views = sliding_window_view(x, (eh, ew), axis=(1, 2))
    return views[:, ::sh, ::sw, :, ::dh, ::dw]


def _conv2d_linear(
    x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None, strides: tuple[int, int],
    padding: str, dilation: tuple[int, int] = (1, 1), groups: int = 1,
) -> np.ndarray:
    """Cross-correlation (N, H, W, C) * kernel (kh, kw, C/groups, F) + bias -> (N, OH, OW, F)."""
    kh, kw, group_in, filters = kernel.shape
    group_out = filters // groups
    # (C/g, kh, kw, F) so a tensordot over the last three patch axes is the window sum.
    weights = kernel.transpose(2, 0, 1, 3)
    patch_bytes = 8 * kh * kw * x.shape[3] * x.shape[1] * x.shape[2]
    chunk = max(1, _PATCH_BYTES // max(patch_bytes, 1))
    outputs = []
    for start in range(0, x.shape[0], chunk):
        patches = _windows(x[start:start + chunk], (kh, kw), strides, padding, dilation)
        parts = [
            np.tensordot(
                patches[:, :, :, g * group_in:(g + 1) * group_in],
                weights[..., g * group_out:(g + 1) * group_out],
                axes=3,
            )
            for g in range(groups)
        ]
        outputs.append(np.concatenate(parts, axis=-1))
    out = np.concatenate(outputs, axis=0)
    return out if bias is None else out + bias


def _pool(x: np.ndarray, kind: str, window, strides, padding: str) -> np.ndarray:
    """Max or average pooling of (N, H, W, C); 'same' average counts only cells in the image."""
    if kind == "max":
        return _windows(x, window, strides, padding, fill=-np.inf).max(axis=(-2, -1))
    sums = _windows(x, window, strides, padding).sum(axis=(-2, -1))
    inside = np.ones((1, x.shape[1], x.shape[2], 1))
    counts = _windows(inside, window, strides, padding).sum(axis=(-2, -1))
    return sums / counts


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _channels_last(config: dict) -> None:
    if config.get("data_format", "channels_last") != "channels_last":
        raise _Unsupported(f"data_format {config['data_format']!r} (only channels_last)")


def _named_weights(layer) -> dict[str, np.ndarray]:
    """get_weights() keyed by variable name (gamma, beta, moving_mean, kernel, ...), float64."""
    names = [variable.name.split("/")[-1].split(":")[0] for variable in layer.weights]
    return {name: np.asarray(value, np.float64) for name, value in zip(names, layer.get_weights())}


def _conv2d(layer, config: dict, x: np.ndarray) -> np.ndarray:
    _channels_last(config)
    weights = layer.get_weights()
    kernel = np.asarray(weights[0], np.float64)
    bias = np.asarray(weights[1], np.float64) if config.get("use_bias", True) else None
    linear = _conv2d_linear(
        x, kernel, bias, _pair(config["strides"]), config["padding"],
        _pair(config.get("dilation_rate", 1)), int(config.get("groups", 1)),
    )
    return _resolve_activation(config.get("activation")).function(linear)


def _dense(layer, config: dict, x: np.ndarray) -> np.ndarray:
    weights = layer.get_weights()
    if len(weights) not in (1, 2) or config.get("quantization_config"):
        raise _Unsupported("quantized or LoRA Dense (extra weights)")
    out = x @ np.asarray(weights[0], np.float64)
    if config.get("use_bias", True):
        out = out + np.asarray(weights[1], np.float64)
    return _resolve_activation(config.get("activation")).function(out)


def _pooling(kind: str):
    def compute(layer, config: dict, x: np.ndarray) -> np.ndarray:
        _channels_last(config)
        window = _pair(config["pool_size"])
        strides = _pair(config["strides"] if config.get("strides") is not None else window)
        return _pool(x, kind, window, strides, config["padding"])

    return compute


def _global_pooling(kind: str):
    def compute(layer, config: dict, x: np.ndarray) -> np.ndarray:
        _channels_last(config)
        reduce = np.max if kind == "max" else np.mean
        return reduce(x, axis=(1, 2), keepdims=bool(config.get("keepdims", False)))

    return compute


def _flatten(layer, config: dict, x: np.ndarray) -> np.ndarray:
    _channels_last(config)
    return x.reshape(x.shape[0], -1)


def _batch_norm_terms(layer, config: dict, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """BN at inference as x * multiplier + offset, per channel (last axis only)."""
    axis = config.get("axis", -1)
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if axes not in ([-1], [len(layer.input.shape) - 1]):
        raise _Unsupported(f"BatchNormalization over axis {axis!r} (only the channel axis)")
    if config.get("renorm"):
        raise _Unsupported("BatchNormalization with renorm=True")
    weights = _named_weights(layer)
    gamma = weights["gamma"] if config.get("scale", True) else np.ones(channels)
    beta = weights["beta"] if config.get("center", True) else np.zeros(channels)
    multiplier = gamma / np.sqrt(weights["moving_variance"] + float(config["epsilon"]))
    return multiplier, beta - weights["moving_mean"] * multiplier


def _batch_norm(layer, config: dict, x: np.ndarray) -> np.ndarray:
    multiplier, offset = _batch_norm_terms(layer, config, x.shape[-1])
    return x * multiplier + offset


def _rescaling(layer, config: dict, x: np.ndarray) -> np.ndarray:
    scale = np.asarray(config["scale"], np.float64)
    offset = np.asarray(config["offset"], np.float64)
    return x * scale + offset


def _activation_layer(layer, config: dict, x: np.ndarray) -> np.ndarray:
    class_name = type(layer).__name__
    if class_name == "Activation":
        return _resolve_activation(config["activation"]).function(x)
    return _layer_activation(class_name, config).function(x)


def _prelu(layer, config: dict, x: np.ndarray) -> np.ndarray:
    alpha = np.asarray(layer.get_weights()[0], np.float64)
    return np.maximum(x, 0.0) - alpha * np.maximum(-x, 0.0)


def _identity(layer, config: dict, x: np.ndarray) -> np.ndarray:
    return x


def _reshape(layer, config: dict, x: np.ndarray) -> np.ndarray:
    return x.reshape((x.shape[0], *config["target_shape"]))


def _zero_padding(layer, config: dict, x: np.ndarray) -> np.ndarray:
    _channels_last(config)
    (top, bottom), (left, right) = (_pair(side) for side in config["padding"])
    return np.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)])


def _cropping(layer, config: dict, x: np.ndarray) -> np.ndarray:
    _channels_last(config)
    (top, bottom), (left, right) = (_pair(side) for side in config["cropping"])
    return x[:, top:x.shape[1] - bottom, left:x.shape[2] - right, :]


def _depthwise_linear(layer, config: dict, x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Depthwise conv as a grouped conv with one group per input channel: output channel
    c * multiplier + m filters input channel c with kernel[..., c, m] (TensorFlow's order)."""
    kh, kw, channels, multiplier = kernel.shape
    return _conv2d_linear(
        x, kernel.reshape(kh, kw, 1, channels * multiplier), None, _pair(config["strides"]),
        config["padding"], _pair(config.get("dilation_rate", 1)), groups=channels,
    )


def _depthwise_conv2d(layer, config: dict, x: np.ndarray) -> np.ndarray:
    _channels_last(config)
    weights = _named_weights(layer)
    out = _depthwise_linear(layer, config, x, weights["kernel"])
    if config.get("use_bias", True):
        out = out + weights["bias"]
    return _resolve_activation(config.get("activation")).function(out)


def _separable_conv2d(layer, config: dict, x: np.ndarray) -> np.ndarray:
    _channels_last(config)
    weights = _named_weights(layer)
    depthwise = _depthwise_linear(layer, config, x, weights["depthwise_kernel"])
    out = np.tensordot(depthwise, weights["pointwise_kernel"][0, 0], axes=1)
    if config.get("use_bias", True):
        out = out + weights["bias"]
    return _resolve_activation(config.get("activation")).function(out)


def _normalization(layer, config: dict, x: np.ndarray) -> np.ndarray:
    """(x - mean) / max(sqrt(variance), epsilon), or its inverse (`invert=True`)."""
    import keras

    mean = np.asarray(layer.mean, np.float64)
    spread = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)), keras.backend.epsilon())
    return mean + x * spread if config.get("invert") else (x - mean) / spread


def _merge(combine: Callable[[list[np.ndarray]], np.ndarray]):
    def compute(layer, config: dict, x) -> np.ndarray:
        if not isinstance(x, (list, tuple)):
            raise _Unsupported(f"{type(layer).__name__} called on one tensor")
        return combine([np.asarray(part, np.float64) for part in x])

    return compute


def _concatenate(layer, config: dict, x) -> np.ndarray:
    return _merge(lambda parts: np.concatenate(parts, axis=int(config.get("axis", -1))))(
        layer, config, x)


_LAYERS: dict[str, Callable[[object, dict, np.ndarray], np.ndarray]] = {
    "Conv2D": _conv2d,
    "DepthwiseConv2D": _depthwise_conv2d,
    "SeparableConv2D": _separable_conv2d,
    "Normalization": _normalization,
    # Merges broadcast like Keras's: a squeeze-and-excitation gate (N, 1, 1, C) times (N, H, W, C).
    "Add": _merge(lambda parts: functools.reduce(np.add, parts)),
    "Subtract": _merge(lambda parts: parts[0] - parts[1]),
    "Multiply": _merge(lambda parts: functools.reduce(np.multiply, parts)),
    "Average": _merge(lambda parts: functools.reduce(np.add, parts) / len(parts)),
    "Maximum": _merge(lambda parts: functools.reduce(np.maximum, parts)),
    "Minimum": _merge(lambda parts: functools.reduce(np.minimum, parts)),
    "Concatenate": _concatenate,
    "Dense": _dense,
    "MaxPooling2D": _pooling("max"),
    "AveragePooling2D": _pooling("average"),
    "GlobalMaxPooling2D": _global_pooling("max"),
    "GlobalAveragePooling2D": _global_pooling("average"),
    "Flatten": _flatten,
    "BatchNormalization": _batch_norm,
    "Rescaling": _rescaling,
    "Activation": _activation_layer,
    "ReLU": _activation_layer,
    "LeakyReLU": _activation_layer,
    "ELU": _activation_layer,
    "Softmax": _activation_layer,
    "PReLU": _prelu,
    "Reshape": _reshape,
    "ZeroPadding2D": _zero_padding,
    "Cropping2D": _cropping,
    # Identity at inference: the randomness of these layers exists only while training.
    "Dropout": _identity,
    "SpatialDropout2D": _identity,
    "GaussianNoise": _identity,
    "GaussianDropout": _identity,
    "AlphaDropout": _identity,
    "ActivityRegularization": _identity,
    "Identity": _identity,
}


def _layer_config(layer) -> dict:
    try:
        return layer.get_config()
    # e.g. a Lambda or a custom activation whose source cannot be serialized, or a custom
    # layer without get_config (Keras raises a RuntimeError subclass for that)
    except (AttributeError, OSError, RuntimeError, TypeError, ValueError) as error:
        raise _Unsupported(f"get_config() failed: {error}") from None


def _compute_layer(layer, x: np.ndarray) -> np.ndarray:
    """The numpy output of one layer, or _Unsupported with the reason."""
    class_name = type(layer).__name__
    compute = _LAYERS.get(class_name)
    if compute is None:
        raise _Unsupported(f"no numpy implementation of {class_name}")
    return compute(layer, _layer_config(layer), x)


# ---------------------------------------------------------------------------- model plumbing
def _linear_layers(model) -> list:
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


def _model_batch(model, images) -> np.ndarray:
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


def _keras_outputs(model, batch: np.ndarray, batch_size: int = 256,
                   paths: list[str] | None = None) -> dict:
    """Keras's own output of every leaf layer path (or of `paths`), float64, from one compiled
    batched call per chunk of a flat copy of the model (nested models opened; the user's
    layers, not copies)."""
    import keras
    import tensorflow as tf

    from cnnviz.model.graph import is_nested_model, layer_entries, rebuild

    rebuilt = rebuild(model, output=None)
    if paths is None:
        nested = {entry.path for entry in layer_entries(model) if is_nested_model(entry.layer)}
        paths = [path for path in rebuilt.tensors if path not in nested]
    probe = keras.Model(rebuilt.model.inputs[0], [rebuilt.tensors[path] for path in paths])
    run = tf.function(lambda x: probe(x, training=False))
    chunk = min(batch_size, len(batch))
    pieces: list[list[np.ndarray]] = [[] for _ in paths]
    for start in range(0, len(batch), chunk):
        part = batch[start:start + chunk]
        real = len(part)
        if real < chunk:  # pad the last chunk to the traced shape instead of retracing
            part = np.concatenate([part, np.zeros((chunk - real, *part.shape[1:]), part.dtype)])
        outputs = keras.tree.flatten(run(tf.constant(part)))
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
            out = _compute_layer(layer, x)
            traces.append(LayerTrace(path, class_name, out))
            return out
        except _Unsupported as unsupported:
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
    batch = _model_batch(model, images)
    cache: list = []

    def keras_outputs() -> dict:
        if not cache:
            cache.append(_keras_outputs(model, batch))
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
    batch = _model_batch(model, images)
    expected = _keras_outputs(model, batch, batch_size)
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


def format_table(report: VerifyReport) -> str:
    """The report as an aligned plain-text table with a one-line verdict under it."""
    header = ("layer", "type", "output shape", "max |numpy - keras|", "status")
    lines = []
    for row in report.rows:
        if row.reason:
            difference, status = "-", f"UNSUPPORTED ({row.reason})"
        else:
            difference = f"{row.max_difference:.3e}"
            status = "ok" if row.ok else f"DIFFERS (> {report.tolerance:.0e})"
        shape = str(row.output_shape)
        lines.append((row.name, row.class_name, shape, difference, status))
    widths = [max(len(line[column]) for line in [header, *lines]) for column in range(4)]

    def render(cells) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells[:4], widths)]
        padded[3] = cells[3].rjust(widths[3])
        return "  ".join([*padded, cells[4]]).rstrip()

    rule = "  ".join("-" * width for width in [*widths, len(header[4])])
    table = [render(header), rule, *(render(line) for line in lines)]
    if report.ok:
        verdict = (f"OK: all {len(report.rows)} layers match Keras within "
                   f"{report.tolerance:.0e} on {report.image_count} images "
                   f"(max difference {report.max_difference:.3e})")
    else:
        failed = [row.name for row in report.rows if not row.ok]
        verdict = (f"FAILED: {len(failed)} of {len(report.rows)} layers unsupported or "
                   f"differing by more than {report.tolerance:.0e}: {', '.join(failed)}")
        unchecked = [f"{row.name} ({row.class_name})" for row in report.rows if row.reason]
        if unchecked:
            verdict += f"\ncannot check {len(unchecked)} layer(s): {', '.join(unchecked)}"
    return "\n".join([*table, "", verdict])


# ------------------------------------------------------------------------- written-out steps
def _number(value: float) -> str:
    value = float(value)
    if abs(value) < 5e-5:  # no "-0.0000"
        value = 0.0
    return f"{value:.4f}"


def _term(value: float) -> str:
    text = _number(value)
    return f"({text})" if text.startswith("-") else text


def _matrix(matrix: np.ndarray, indent: str) -> list[str]:
    width = max(len(_number(value)) for value in matrix.ravel())
    return [indent + "  ".join(_number(value).rjust(width) for value in row) for row in matrix]


def _vector(values: np.ndarray) -> str:
    return "[" + ", ".join(_number(value) for value in np.ravel(values)) + "]"


def _shape_text(shape) -> str:
    return "x".join(str(size) for size in shape)


def _wrap_sum(prefix: str, terms: list[str], suffix: str, indent: str,
              separator: str = " + ") -> list[str]:
    """`prefix t1 + t2 + ... suffix`, wrapped at ~100 columns with continuation lines.

    A suffix that continues the sum starts with the separator (" + bias b = z").
    """
    lines, current = [], indent + prefix
    pieces = [term if position == 0 else separator + term for position, term in enumerate(terms)]
    if suffix:
        pieces.append(suffix)
    for position, piece in enumerate(pieces):
        if len(current) + len(piece) > 98 and position:
            lines.append(current + separator.rstrip())
            current = indent + "    " + piece.removeprefix(separator)
        else:
            current += piece
    lines.append(current)
    return lines


def _summary(values: np.ndarray) -> str:
    return (f"{_shape_text(values.shape)} values, min {_number(values.min())}, "
            f"max {_number(values.max())}, mean {_number(values.mean())}")


def _feature_maps(x: np.ndarray, title: str, indent: str) -> list[str]:
    """Each channel of one (H, W, C) map as a matrix, or the vector of a 1-D output.

    Maps wider or taller than _PRINTED_SIDE (vectors longer than _PRINTED_LENGTH) are
    summarised; a 28x28 matrix does not fit on a line.
    """
    if x.ndim == 1:
        shown = _vector(x) if x.size <= _PRINTED_LENGTH else _summary(x)
        return [f"{indent}{title}: {shown}"]
    lines = []
    for channel in range(x.shape[-1]):
        if max(x.shape[:-1]) > _PRINTED_SIDE:
            lines.append(f"{indent}{title}, channel {channel}: {_summary(x[..., channel])}")
            continue
        lines.append(f"{indent}{title}, channel {channel}:")
        lines.extend(_matrix(x[..., channel], indent + "    "))
    return lines


def _activation_lines(activation: _Activation, before: np.ndarray, after: np.ndarray,
                      indent: str, max_positions: int) -> list[str]:
    if activation.name == "linear":
        return []
    lines = [f"{indent}{activation.name}: f(x) = {activation.formula}"]
    if activation.elementwise and before.size <= max_positions:
        pairs = [f"{activation.name}({_number(b)}) = {_number(a)}"
                 for b, a in zip(before.ravel(), after.ravel())]
        lines.extend(_wrap_sum("", pairs, "", indent + "    ", separator="; "))
    return lines


def _explain_conv(layer, config, x, indent, max_positions) -> tuple[list[str], np.ndarray]:
    weights = layer.get_weights()
    kernel = np.asarray(weights[0], np.float64)
    use_bias = config.get("use_bias", True)
    bias = np.asarray(weights[1], np.float64) if use_bias else np.zeros(kernel.shape[-1])
    strides, padding = _pair(config["strides"]), config["padding"]
    dilation, groups = _pair(config.get("dilation_rate", 1)), int(config.get("groups", 1))
    activation = _resolve_activation(config.get("activation"))
    linear = _conv2d_linear(x[None], kernel, bias, strides, padding, dilation, groups)[0]
    out = activation.function(linear)
    kh, kw, group_in, filters = kernel.shape
    lines = [f"{indent}{filters} filter(s) of {kh}x{kw}x{group_in}, strides "
             f"{_shape_text(strides)}, padding {padding!r}, activation {activation.name!r}"
             + (f", dilation {_shape_text(dilation)}" if dilation != (1, 1) else "")
             + (f", groups {groups}" if groups != 1 else "")]
    detail = linear.size <= max_positions
    if padding == "same":
        lines.append(f"{indent}'same' padding: cells outside the image count as 0")
    rows = _window_origins(x.shape[0], kh, strides[0], padding, dilation[0])
    cols = _window_origins(x.shape[1], kw, strides[1], padding, dilation[1])
    padded = np.pad(x, [(kh * dilation[0],) * 2, (kw * dilation[1],) * 2, (0, 0)])
    for f in range(filters):
        first_channel = (f // (filters // groups)) * group_in
        lines.append(f"{indent}filter {f}: bias = {_number(bias[f])}")
        for c in range(group_in):
            lines.append(f"{indent}  kernel, input channel {first_channel + c}:")
            lines.extend(_matrix(kernel[:, :, c, f], indent + "      "))
        if not detail:
            continue
        for i, top in enumerate(rows):
            for j, left in enumerate(cols):
                r0, c0 = top + kh * dilation[0], left + kw * dilation[1]
                window = padded[r0:r0 + (kh - 1) * dilation[0] + 1:dilation[0],
                                c0:c0 + (kw - 1) * dilation[1] + 1:dilation[1],
                                first_channel:first_channel + group_in]
                last_row = top + (kh - 1) * dilation[0]
                last_col = left + (kw - 1) * dilation[1]
                lines.append(f"{indent}  output ({i}, {j}), filter {f}: window rows "
                             f"{top}..{last_row}, cols {left}..{last_col}")
                for c in range(group_in):
                    lines.append(f"{indent}    window, input channel {first_channel + c}:")
                    lines.extend(_matrix(window[:, :, c], indent + "        "))
                terms = [f"{_term(v)}*{_term(w)}"
                         for v, w in zip(window.ravel(), kernel[:, :, :, f].ravel())]
                tail = f" + bias {_term(bias[f])} = {_number(linear[i, j, f])}"
                if len(terms) > 27:
                    products = float(np.sum(window * kernel[:, :, :, f]))
                    lines.append(f"{indent}    sum(window * kernel) = {_number(products)}{tail}")
                else:
                    lines.extend(_wrap_sum("sum(window * kernel) = ", terms, tail,
                                           indent + "    "))
    if not detail:
        lines.append(f"{indent}(per-position sums left out: {linear.size} outputs > "
                     f"max_positions={max_positions})")
    if activation.name != "linear":
        lines.extend(_feature_maps(linear, "before activation", indent))
        lines.extend(_activation_lines(activation, linear, out, indent, max_positions))
    lines.extend(_feature_maps(out, "feature map", indent))
    return lines, out


def _explain_pool(layer, config, x, indent, max_positions) -> tuple[list[str], np.ndarray]:
    kind = "max" if type(layer).__name__ == "MaxPooling2D" else "mean"
    window = _pair(config["pool_size"])
    strides = _pair(config["strides"] if config.get("strides") is not None else window)
    padding = config["padding"]
    out = _pool(x[None], "max" if kind == "max" else "average", window, strides, padding)[0]
    lines = [(f"{indent}{_shape_text(window)} windows, strides {_shape_text(strides)}, "
              f"padding {padding!r}: each output is the {kind} of its window")]
    if padding == "same":
        lines.append(f"{indent}'same' padding: cells outside the image are left out")
    if out.size <= max_positions:
        rows = _window_origins(x.shape[0], window[0], strides[0], padding)
        cols = _window_origins(x.shape[1], window[1], strides[1], padding)
        for c in range(x.shape[-1]):
            for i, top in enumerate(rows):
                for j, left in enumerate(cols):
                    cells = x[max(top, 0):top + window[0], max(left, 0):left + window[1], c]
                    values = ", ".join(_number(v) for v in cells.ravel())
                    lines.append(f"{indent}  output ({i}, {j}), channel {c}: rows "
                                 f"{max(top, 0)}..{min(top + window[0], x.shape[0]) - 1}, "
                                 f"cols {max(left, 0)}..{min(left + window[1], x.shape[1]) - 1}"
                                 f": {kind}({values}) = {_number(out[i, j, c])}")
    lines.extend(_feature_maps(out, "pooled", indent))
    return lines, out


def _explain_dense(layer, config, x, indent, max_positions) -> tuple[list[str], np.ndarray]:
    if x.ndim != 1:  # Dense on a feature map acts per cell; show the result only
        return _explain_generic(layer, config, x, indent, max_positions)
    weights = layer.get_weights()
    kernel = np.asarray(weights[0], np.float64)
    bias = (np.asarray(weights[1], np.float64) if config.get("use_bias", True)
            else np.zeros(kernel.shape[1]))
    activation = _resolve_activation(config.get("activation"))
    z = x @ kernel + bias
    out = activation.function(z)
    lines = [(f"{indent}{kernel.shape[1]} unit(s), each z = x . w + b, activation "
              f"{activation.name!r}")]
    for unit in range(kernel.shape[1]):
        tail = f" + bias {_term(bias[unit])} = {_number(z[unit])}"
        if x.size > max_positions:
            products = float(x @ kernel[:, unit])
            lines.append(f"{indent}  unit {unit}: z = sum of {x.size} products x_i*w_i "
                         f"= {_number(products)}{tail}")
            continue
        terms = [f"{_term(v)}*{_term(w)}" for v, w in zip(x, kernel[:, unit])]
        lines.extend(_wrap_sum(f"unit {unit}: z = ", terms, tail, indent + "  "))
    lines.extend(_activation_lines(activation, z, out, indent, max_positions))
    lines.append(f"{indent}output: {_vector(out)}")
    return lines, out


def _explain_batch_norm(layer, config, x, indent, max_positions) -> tuple[list[str], np.ndarray]:
    multiplier, offset = _batch_norm_terms(layer, config, x.shape[-1])
    weights = _named_weights(layer)
    epsilon = float(config["epsilon"])
    lines = [(f"{indent}inference: (x - moving_mean) / sqrt(moving_variance + {epsilon:g}) "
              f"* gamma + beta = x * a + b, per channel")]
    for c in range(x.shape[-1]):
        gamma = weights["gamma"][c] if config.get("scale", True) else 1.0
        beta = weights["beta"][c] if config.get("center", True) else 0.0
        lines.append(f"{indent}  channel {c}: mean {_number(weights['moving_mean'][c])}, "
                     f"variance {_number(weights['moving_variance'][c])}, gamma "
                     f"{_number(gamma)}, beta {_number(beta)} -> a = {_number(multiplier[c])}, "
                     f"b = {_number(offset[c])}")
    out = x * multiplier + offset
    lines.extend(_feature_maps(out, "normalized", indent))
    return lines, out


def _explain_generic(layer, config, x, indent, max_positions) -> tuple[list[str], np.ndarray]:
    class_name = type(layer).__name__
    out = _compute_layer(layer, x[None])[0]
    lines = []
    if class_name == "Flatten":
        lines.append(f"{indent}{_shape_text(x.shape)} read row by row, channels last "
                     f"-> vector of {out.size}")
    elif class_name in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        kind = "mean" if class_name == "GlobalAveragePooling2D" else "max"
        lines.append(f"{indent}{kind} of each channel over all {x.shape[0]}x{x.shape[1]} cells")
    elif _LAYERS[class_name] is _identity:
        lines.append(f"{indent}identity at inference (active only while training)")
    elif class_name == "Rescaling":
        lines.append(f"{indent}x * {config['scale']} + {config['offset']}")
    elif _LAYERS[class_name] is _activation_layer:
        activation = (_resolve_activation(config["activation"]) if class_name == "Activation"
                      else _layer_activation(class_name, config))
        lines.extend(_activation_lines(activation, x, out, indent, max_positions))
    lines.extend(_feature_maps(out, "output", indent))
    return lines, out


_EXPLAINERS = {
    "Conv2D": _explain_conv,
    "MaxPooling2D": _explain_pool,
    "AveragePooling2D": _explain_pool,
    "Dense": _explain_dense,
    "BatchNormalization": _explain_batch_norm,
}


def explain_steps(model, image, *, max_params: int = 1000, max_positions: int = 64) -> str:
    """Write one image's forward pass out the way one checks a CNN by hand.

    The input matrix; for each conv output the window, the elementwise products summed plus the
    bias; the activation of each value; each pooling window and its max (or mean); the flattened
    vector; each Dense unit's dot product as terms + bias = z and its activation; finally the
    model's own (Keras) output beside the numbers written out. Numbers have 4 decimals; every
    value comes from the numpy reference pass, so the text and `verify` agree.

    Args:
        model: a small built Keras chain of supported layers (see `reference_forward`).
        image: one image (H, W, C) or a batch of one (1, H, W, C).
        max_params: refuse models with more parameters than this (the text would be unreadable).
        max_positions: per layer, write out per-position sums (and a Dense unit's products)
            only when it has at most this many outputs (inputs); bigger layers get their
            settings and results only. Maps over 12x12 and vectors over 64 are summarised
            (shape, min, max, mean).

    Returns:
        The steps as one multi-line string.

    Raises:
        CnnvizError: the model is too big, not a chain, has a layer without a numpy
            implementation, or the image does not fit it.
    """
    params = int(model.count_params())
    if params > max_params:
        raise CnnvizError(
            f"explain_steps writes every multiplication out; model {model.name!r} has {params} "
            f"parameters (max_params={max_params}). Use a model under {max_params} parameters "
            f"(e.g. one 3x3 Conv2D filter, a 2x2 max pool, Flatten, Dense(1)), or `verify` for "
            f"big models"
        )
    layers = _linear_layers(model)
    batch = _model_batch(model, image)
    if len(batch) != 1:
        raise CnnvizError(f"explain_steps takes one image; received a batch of {len(batch)}")
    missing = [f"{layer.name} ({type(layer).__name__})" for layer in layers
               if type(layer).__name__ not in _LAYERS]
    if missing:
        raise CnnvizError(
            f"explain_steps cannot write out {', '.join(missing)}; supported layer types: "
            f"{', '.join(sorted(_LAYERS))}"
        )
    x = batch[0].astype(np.float64)
    lines = [f"Input image {_shape_text(x.shape)} (rows x columns x channels):"]
    lines.extend(_feature_maps(x, "input", "  "))
    for number, layer in enumerate(layers, start=1):
        class_name = type(layer).__name__
        config = _layer_config(layer)
        lines.append("")
        explainer = _EXPLAINERS.get(class_name, _explain_generic)
        try:
            body, out = explainer(layer, config, x, "  ", max_positions)
        except _Unsupported as reason:
            raise CnnvizError(f"explain_steps cannot write out layer {layer.name!r}: "
                              f"{reason}") from None
        lines.append(f"Step {number}: {layer.name} ({class_name}) "
                     f"{_shape_text(x.shape)} -> {_shape_text(out.shape)}")
        lines.extend(body)
        x = out
    last = layers[-1].name
    keras_output = _keras_outputs(model, batch, paths=[last])[last][0]
    difference = float(np.max(np.abs(keras_output - x), initial=0.0))
    lines.extend([
        "",
        f"Output by hand: {_vector(x)}",
        f"Keras output:   {_vector(keras_output)} (max difference {difference:.1e})",
    ])
    return "\n".join(lines)
