"""Activation functions in plain numpy, as Keras defines them, for the reference forward pass."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class Unsupported(Exception):
    """A layer (or option of one) the numpy pass does not recompute; the message says why."""


# ------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class NumpyActivation:
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


_STRING_ACTIVATIONS: dict[str, NumpyActivation] = {
    activation.name: activation
    for activation in (
        NumpyActivation("linear", "x", lambda x: x),
        NumpyActivation("relu", "max(0, x)", lambda x: np.maximum(x, 0.0)),
        NumpyActivation(
            "leaky_relu", "x if x >= 0 else 0.2*x", lambda x: np.where(x >= 0, x, 0.2 * x)
        ),
        NumpyActivation("relu6", "min(max(0, x), 6)", _relu6),
        NumpyActivation("tanh", "tanh(x)", np.tanh),
        NumpyActivation("sigmoid", "1 / (1 + exp(-x))", _sigmoid),
        NumpyActivation("softmax", "exp(z_k) / sum_j exp(z_j)", _softmax, elementwise=False),
        NumpyActivation("log_softmax", "z_k - log(sum_j exp(z_j))",
                    lambda x: np.log(_softmax(x)), elementwise=False),
        NumpyActivation("elu", "x if x > 0 else exp(x) - 1", _elu),
        NumpyActivation(
            "selu", f"{_SELU_SCALE:.4f} * (x if x > 0 else {_SELU_ALPHA:.4f}*(exp(x) - 1))",
            lambda x: _SELU_SCALE * _elu(x, _SELU_ALPHA),
        ),
        NumpyActivation("silu", "x * sigmoid(x)", lambda x: x * _sigmoid(x)),
        NumpyActivation("swish", "x * sigmoid(x)", lambda x: x * _sigmoid(x)),
        NumpyActivation("gelu", "x * Phi(x) (normal CDF)", _gelu),
        NumpyActivation("softplus", "log(1 + exp(x))", _softplus),
        NumpyActivation("softsign", "x / (1 + |x|)", lambda x: x / (1.0 + np.abs(x))),
        NumpyActivation("mish", "x * tanh(softplus(x))", lambda x: x * np.tanh(_softplus(x))),
        NumpyActivation("exponential", "exp(x)", np.exp),
        NumpyActivation("hard_sigmoid", "relu6(x + 3) / 6", lambda x: _relu6(x + 3.0) / 6.0),
        NumpyActivation("hard_silu", "x * relu6(x + 3) / 6", lambda x: x * _relu6(x + 3.0) / 6.0),
        NumpyActivation("hard_swish", "x * relu6(x + 3) / 6", lambda x: x * _relu6(x + 3.0) / 6.0),
    )
}


def layer_activation(class_name: str, config: dict) -> NumpyActivation:
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
        return NumpyActivation(
            "relu", formula, lambda x: _keras_relu(x, slope, top, threshold)
        )
    if class_name == "LeakyReLU":
        slope = float(config["negative_slope"])
        return NumpyActivation(
            "leaky_relu", f"x if x >= 0 else {slope:g}*x", lambda x: np.where(x >= 0, x, slope * x)
        )
    if class_name == "ELU":
        alpha = float(config.get("alpha", 1.0))
        return NumpyActivation("elu", f"x if x > 0 else {alpha:g}*(exp(x) - 1)",
                           lambda x: _elu(x, alpha))
    if class_name == "Softmax":
        axis = config.get("axis", -1)
        axis = tuple(axis) if isinstance(axis, (list, tuple)) else int(axis)
        return NumpyActivation("softmax", "exp(z_k) / sum_j exp(z_j)",
                           lambda x: _softmax(x, axis), elementwise=False)
    raise Unsupported(f"activation layer {class_name}")


def resolve_activation(spec) -> NumpyActivation:
    """An activation from a layer config's `activation` entry (a name or a serialized layer)."""
    if spec is None:
        return _STRING_ACTIVATIONS["linear"]
    if isinstance(spec, str):
        if spec not in _STRING_ACTIVATIONS:
            raise Unsupported(f"activation {spec!r}")
        return _STRING_ACTIVATIONS[spec]
    if isinstance(spec, dict):
        class_name, inner = spec.get("class_name"), spec.get("config")
        if spec.get("module") == "keras.layers" and isinstance(inner, dict):
            return layer_activation(class_name, inner)
        if class_name == "function" and isinstance(inner, str):
            return resolve_activation(inner)
    raise Unsupported(f"activation {spec!r}")
