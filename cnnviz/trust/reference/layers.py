"""Keras layers recomputed in plain numpy (convolutions, pooling, dense, normalization, merges),
one function per layer type."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnnviz.trust.reference.activations import Unsupported, layer_activation, resolve_activation

# Patches of one conv chunk are materialised; keep a chunk under ~64 MB of float64.
_PATCH_BYTES = 64 * 2**20


# ------------------------------------------------------------------------- windows and layers
def _same_padding(size: int, window: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF's SAME padding of one axis: (before, after); the extra cell goes after."""
    effective = (window - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def window_origins(
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
        raise Unsupported(f"padding {padding!r}")
    if x.shape[1] < eh or x.shape[2] < ew:
        raise Unsupported(f"window {eh}x{ew} larger than the input {x.shape[1]}x{x.shape[2]}")
    views = sliding_window_view(x, (eh, ew), axis=(1, 2))
    return views[:, ::sh, ::sw, :, ::dh, ::dw]


def conv2d_linear(
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


def pool_windows(x: np.ndarray, kind: str, window, strides, padding: str) -> np.ndarray:
    """Max or average pooling of (N, H, W, C); 'same' average counts only cells in the image."""
    if kind == "max":
        return _windows(x, window, strides, padding, fill=-np.inf).max(axis=(-2, -1))
    sums = _windows(x, window, strides, padding).sum(axis=(-2, -1))
    inside = np.ones((1, x.shape[1], x.shape[2], 1))
    counts = _windows(inside, window, strides, padding).sum(axis=(-2, -1))
    return sums / counts


def as_pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _channels_last(config: dict) -> None:
    if config.get("data_format", "channels_last") != "channels_last":
        raise Unsupported(f"data_format {config['data_format']!r} (only channels_last)")


def named_weights(layer) -> dict[str, np.ndarray]:
    """get_weights() keyed by variable name (gamma, beta, moving_mean, kernel, ...), float64."""
    names = [variable.name.split("/")[-1].split(":")[0] for variable in layer.weights]
    return {name: np.asarray(value, np.float64) for name, value in zip(names, layer.get_weights())}


def _conv2d(layer, config: dict, x: np.ndarray) -> np.ndarray:
    _channels_last(config)
    weights = layer.get_weights()
    kernel = np.asarray(weights[0], np.float64)
    bias = np.asarray(weights[1], np.float64) if config.get("use_bias", True) else None
    linear = conv2d_linear(
        x, kernel, bias, as_pair(config["strides"]), config["padding"],
        as_pair(config.get("dilation_rate", 1)), int(config.get("groups", 1)),
    )
    return resolve_activation(config.get("activation")).function(linear)


def _dense(layer, config: dict, x: np.ndarray) -> np.ndarray:
    weights = layer.get_weights()
    if len(weights) not in (1, 2) or config.get("quantization_config"):
        raise Unsupported("quantized or LoRA Dense (extra weights)")
    out = x @ np.asarray(weights[0], np.float64)
    if config.get("use_bias", True):
        out = out + np.asarray(weights[1], np.float64)
    return resolve_activation(config.get("activation")).function(out)


def _pooling(kind: str):
    def compute(layer, config: dict, x: np.ndarray) -> np.ndarray:
        _channels_last(config)
        window = as_pair(config["pool_size"])
        strides = as_pair(config["strides"] if config.get("strides") is not None else window)
        return pool_windows(x, kind, window, strides, config["padding"])

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


def batch_norm_terms(layer, config: dict, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """BN at inference as x * multiplier + offset, per channel (last axis only)."""
    axis = config.get("axis", -1)
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if axes not in ([-1], [len(layer.input.shape) - 1]):
        raise Unsupported(f"BatchNormalization over axis {axis!r} (only the channel axis)")
    if config.get("renorm"):
        raise Unsupported("BatchNormalization with renorm=True")
    weights = named_weights(layer)
    gamma = weights["gamma"] if config.get("scale", True) else np.ones(channels)
    beta = weights["beta"] if config.get("center", True) else np.zeros(channels)
    multiplier = gamma / np.sqrt(weights["moving_variance"] + float(config["epsilon"]))
    return multiplier, beta - weights["moving_mean"] * multiplier


def _batch_norm(layer, config: dict, x: np.ndarray) -> np.ndarray:
    multiplier, offset = batch_norm_terms(layer, config, x.shape[-1])
    return x * multiplier + offset


def _rescaling(layer, config: dict, x: np.ndarray) -> np.ndarray:
    scale = np.asarray(config["scale"], np.float64)
    offset = np.asarray(config["offset"], np.float64)
    return x * scale + offset


def activation_layer(layer, config: dict, x: np.ndarray) -> np.ndarray:
    class_name = type(layer).__name__
    if class_name == "Activation":
        return resolve_activation(config["activation"]).function(x)
    return layer_activation(class_name, config).function(x)


def _prelu(layer, config: dict, x: np.ndarray) -> np.ndarray:
    alpha = np.asarray(layer.get_weights()[0], np.float64)
    return np.maximum(x, 0.0) - alpha * np.maximum(-x, 0.0)


def identity_layer(layer, config: dict, x: np.ndarray) -> np.ndarray:
    return x


def _reshape(layer, config: dict, x: np.ndarray) -> np.ndarray:
    return x.reshape((x.shape[0], *config["target_shape"]))


def _zero_padding(layer, config: dict, x: np.ndarray) -> np.ndarray:
    _channels_last(config)
    (top, bottom), (left, right) = (as_pair(side) for side in config["padding"])
    return np.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)])


def _cropping(layer, config: dict, x: np.ndarray) -> np.ndarray:
    _channels_last(config)
    (top, bottom), (left, right) = (as_pair(side) for side in config["cropping"])
    return x[:, top:x.shape[1] - bottom, left:x.shape[2] - right, :]


def _depthwise_linear(layer, config: dict, x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Depthwise conv as a grouped conv with one group per input channel: output channel
    c * multiplier + m filters input channel c with kernel[..., c, m] (TensorFlow's order)."""
    kh, kw, channels, multiplier = kernel.shape
    return conv2d_linear(
        x, kernel.reshape(kh, kw, 1, channels * multiplier), None, as_pair(config["strides"]),
        config["padding"], as_pair(config.get("dilation_rate", 1)), groups=channels,
    )


def _depthwise_conv2d(layer, config: dict, x: np.ndarray) -> np.ndarray:
    _channels_last(config)
    weights = named_weights(layer)
    out = _depthwise_linear(layer, config, x, weights["kernel"])
    if config.get("use_bias", True):
        out = out + weights["bias"]
    return resolve_activation(config.get("activation")).function(out)


def _separable_conv2d(layer, config: dict, x: np.ndarray) -> np.ndarray:
    _channels_last(config)
    weights = named_weights(layer)
    depthwise = _depthwise_linear(layer, config, x, weights["depthwise_kernel"])
    out = np.tensordot(depthwise, weights["pointwise_kernel"][0, 0], axes=1)
    if config.get("use_bias", True):
        out = out + weights["bias"]
    return resolve_activation(config.get("activation")).function(out)


def _normalization(layer, config: dict, x: np.ndarray) -> np.ndarray:
    """(x - mean) / max(sqrt(variance), epsilon), or its inverse (`invert=True`)."""
    import keras

    mean = np.asarray(layer.mean, np.float64)
    spread = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)), keras.backend.epsilon())
    return mean + x * spread if config.get("invert") else (x - mean) / spread


def _merge(combine: Callable[[list[np.ndarray]], np.ndarray]):
    def compute(layer, config: dict, x) -> np.ndarray:
        if not isinstance(x, (list, tuple)):
            raise Unsupported(f"{type(layer).__name__} called on one tensor")
        return combine([np.asarray(part, np.float64) for part in x])

    return compute


def _concatenate(layer, config: dict, x) -> np.ndarray:
    return _merge(lambda parts: np.concatenate(parts, axis=int(config.get("axis", -1))))(
        layer, config, x)


LAYERS: dict[str, Callable[[object, dict, np.ndarray], np.ndarray]] = {
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
    "Activation": activation_layer,
    "ReLU": activation_layer,
    "LeakyReLU": activation_layer,
    "ELU": activation_layer,
    "Softmax": activation_layer,
    "PReLU": _prelu,
    "Reshape": _reshape,
    "ZeroPadding2D": _zero_padding,
    "Cropping2D": _cropping,
    # Identity at inference: the randomness of these layers exists only while training.
    "Dropout": identity_layer,
    "SpatialDropout2D": identity_layer,
    "GaussianNoise": identity_layer,
    "GaussianDropout": identity_layer,
    "AlphaDropout": identity_layer,
    "ActivityRegularization": identity_layer,
    "Identity": identity_layer,
}


def layer_config(layer) -> dict:
    try:
        return layer.get_config()
    # e.g. a Lambda or a custom activation whose source cannot be serialized, or a custom
    # layer without get_config (Keras raises a RuntimeError subclass for that)
    except (AttributeError, OSError, RuntimeError, TypeError, ValueError) as error:
        raise Unsupported(f"get_config() failed: {error}") from None


def compute_layer(layer, x: np.ndarray) -> np.ndarray:
    """The numpy output of one layer, or Unsupported with the reason."""
    class_name = type(layer).__name__
    compute = LAYERS.get(class_name)
    if compute is None:
        raise Unsupported(f"no numpy implementation of {class_name}")
    return compute(layer, layer_config(layer), x)
