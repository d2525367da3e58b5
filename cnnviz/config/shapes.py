"""Shape walk of a configured layer stack: every kernel and pool must fit the map it receives."""

from __future__ import annotations

import math

from cnnviz.config.base import MAX_PARAMETERS, as_pair
from cnnviz.config.data import DataConfig
from cnnviz.config.model import (
    BatchNormLayer,
    Conv2DLayer,
    DenseLayer,
    DropoutLayer,
    FlattenLayer,
    ModelConfig,
    PoolLayer,
)

# ------------------------------------------------------------------------------ shape checking
_NATIVE_SHAPES = {
    "digits": (8, 8, 1),
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
}


def native_input_shape(data: DataConfig) -> tuple[int, int, int] | None:
    """The model's input shape as the config determines it, or None when only the data can tell."""
    if data.source == "shapes":
        size = data.image_size or [32, 32]
        return (size[0], size[1], 3)
    if data.source == "directory":
        if data.image_size is None:
            return (256, 256, 1 if data.color_mode == "grayscale" else 3)
        return (*data.image_size, 1 if data.color_mode == "grayscale" else 3)
    if data.source == "inline":
        import numpy as np

        try:
            first = np.asarray(data.images[0], dtype=np.float32)
        except (ValueError, TypeError) as error:
            raise ValueError(f"data.images.0 is not a numeric matrix: {error}") from None
        if first.ndim not in (2, 3):
            raise ValueError(f"data.images.0 must be [H][W] or [H][W][C]; got {first.ndim} dims")
        shape = first.shape if first.ndim == 3 else (*first.shape, 1)
        return tuple(data.image_size or shape[:2]) + (shape[2],)
    native = _NATIVE_SHAPES.get(data.source)
    if native is None:
        return None
    if data.image_size:
        return (data.image_size[0], data.image_size[1], native[2])
    return native


def _out_size(size: int, window: int, stride: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(size / stride)
    return (size - window) // stride + 1


def check_layer_shapes(model: ModelConfig, input_shape: tuple[int, ...]) -> None:
    """Walk the layer list over `input_shape` and raise ValueError at the first impossible layer.

    Catches a kernel or pool larger than the feature map it meets, and a Dense/Conv layer
    after the map was flattened, before Keras builds anything.
    """
    if model.backbone is not None:
        if min(input_shape[:2]) < 32:
            raise ValueError(
                f"model.backbone {model.backbone.name} needs images of at least 32x32; the data "
                f"gives {input_shape[0]}x{input_shape[1]} (set data.image_size)"
            )
        for index, layer in enumerate(model.layers):
            if not isinstance(layer, (DenseLayer, DropoutLayer, BatchNormLayer)):
                # ValueError, not TypeError: pydantic reports it with the config location.
                raise ValueError(  # noqa: TRY004
                    f"model.layers.{index} ({layer.type}): after a backbone (pooled to a vector) "
                    "only dense, dropout and batch_norm layers fit"
                )
        return
    height, width, channels = input_shape
    flat = False
    parameters: list[tuple[int, str]] = []  # (count, where) per layer with weights
    for index, layer in enumerate(model.layers):
        where = f"model.layers.{index}"
        if isinstance(layer, (Conv2DLayer, PoolLayer)):
            if flat:
                raise ValueError(
                    f"{where} ({layer.type}) comes after the feature map was flattened")
            window = as_pair(layer.kernel if isinstance(layer, Conv2DLayer) else layer.pool)
            stride = as_pair(layer.stride if layer.stride is not None else window)
            field = "kernel" if isinstance(layer, Conv2DLayer) else "pool"
            if layer.padding == "valid" and (window[0] > height or window[1] > width):
                raise ValueError(
                    f"{where}.{field}={list(window)} is larger than the {height}x{width} feature "
                    f"map it receives; use a window of at most {height}x{width} or padding 'same'"
                )
            height = _out_size(height, window[0], stride[0], layer.padding)
            width = _out_size(width, window[1], stride[1], layer.padding)
            if isinstance(layer, Conv2DLayer):
                parameters.append((window[0] * window[1] * channels * layer.filters + layer.filters,
                                   f"{where} (conv2d, {layer.filters} filters)"))
                channels = layer.filters
        elif isinstance(layer, FlattenLayer):
            flat = True
            channels = height * width * channels if layer.type == "flatten" else channels
        elif isinstance(layer, DenseLayer):
            if not flat:
                raise ValueError(
                    f"{where} (dense) needs a flatten or global_avg_pool2d layer before it"
                )
            parameters.append((channels * layer.units + layer.units,
                               f"{where} (dense, {layer.units} units after {channels:,} features)"))
            channels = layer.units
    if not flat:
        raise ValueError(
            "model.layers must include a flatten or global_avg_pool2d layer before the output"
        )
    total = sum(count for count, _ in parameters)
    if total > MAX_PARAMETERS:
        count, where = max(parameters)
        raise ValueError(
            f"model.layers: the model would have {total:,} parameters, more than the "
            f"{MAX_PARAMETERS:,} cnnviz trains; {where} alone has {count:,} (use fewer "
            "filters or units, or pool before flattening)"
        )
