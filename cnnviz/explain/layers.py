"""Looking inside a CNN: a conv layer's kernels, and any layer's feature maps for a batch.

Both answer "what does this layer hold / compute" without gradients: `filters` reads the weights,
`feature_maps` runs one compiled forward pass of the sub-model input -> layer output.
"""

from __future__ import annotations

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.explain._common import INPUT_LAYERS, as_image_batch, get_layer


def resolve_layer(model, layer):
    """The layer object for `layer` (a name or a layer of `model`); a CnnvizError when absent."""
    if isinstance(layer, str):
        return get_layer(model, layer)
    if any(candidate is layer for candidate in model.layers):
        return layer
    names = ", ".join(candidate.name for candidate in model.layers)
    raise CnnvizError(
        f"layer {getattr(layer, 'name', layer)!r} is not a layer of model {model.name!r}. "
        f"Layers: {names}"
    )


def layer_model(model, layer):
    """`keras.Model` from the model's input to `layer`'s output, sharing (only reading) its layers."""
    import keras

    # One input passed as a tensor, not a 1-list: Keras warns when the call structure differs.
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, layer.output)


def _conv_layer_names(model) -> list[str]:
    import keras

    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def filters(model, layer) -> np.ndarray:
    """The kernel weights of a Conv2D layer.

    Args:
        model: a built Keras model.
        layer: the Conv2D layer, by name or as a layer object of `model`.

    Returns:
        float32 array (kh, kw, in_channels, filters): `layer.get_weights()[0]`, the bias left out.

    Raises:
        CnnvizError: the layer is missing or not a Conv2D layer (the message lists the Conv2D ones).
    """
    import keras

    conv = resolve_layer(model, layer)
    if not isinstance(conv, keras.layers.Conv2D):
        choices = ", ".join(_conv_layer_names(model)) or "none"
        raise CnnvizError(
            f"layer {conv.name!r} is a {type(conv).__name__}, not a Conv2D layer. "
            f"Conv2D layers: {choices}"
        )
    return np.asarray(conv.get_weights()[0], dtype=np.float32)


def _output_rank(layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return None


def feature_maps(model, images, layer, *, batch_size: int = 256) -> np.ndarray:
    """The outputs of `layer` for a batch of images: what each of its channels responds to.

    One compiled forward pass of `keras.Model(model.inputs, layer.output)` per chunk of
    `batch_size` images; the last chunk is padded to the full size so the function is traced once.

    Args:
        model: a built Keras model (Sequential, with or without an explicit Input, or functional).
        images: (N, H, W, C) or a single (H, W, C) image, in the model's input scale.
        layer: a layer with a 4-D output (N, h, w, channels), by name or as a layer object.
        batch_size: images per forward pass.

    Returns:
        float32 array (N, h, w, channels).

    Raises:
        CnnvizError: the layer is missing or its output is not 4-D (the message lists the layers
            that have a 4-D output).
    """
    import tensorflow as tf

    target = resolve_layer(model, layer)
    if _output_rank(target) != 4:
        choices = ", ".join(
            candidate.name
            for candidate in model.layers
            if _output_rank(candidate) == 4 and type(candidate).__name__ not in INPUT_LAYERS
        )
        raise CnnvizError(
            f"layer {target.name!r} has no 4-D output (N, h, w, channels) to show as feature maps. "
            f"Layers with one: {choices or 'none'}"
        )
    if batch_size < 1:
        raise CnnvizError(f"batch_size must be at least 1; received batch_size={batch_size}")
    batch = as_image_batch(images)
    sub_model = layer_model(model, target)

    @tf.function
    def forward(chunk):
        return sub_model(chunk, training=False)

    count = len(batch)
    if count == 0:
        return np.zeros((0, *target.output.shape[1:]), dtype=np.float32)
    size = min(batch_size, count)
    outputs = []
    for start in range(0, count, size):
        chunk = batch[start : start + size]
        real = len(chunk)
        if real < size:  # pad to the traced shape instead of retracing for the last chunk
            chunk = np.concatenate([chunk, np.zeros((size - real, *chunk.shape[1:]), np.float32)])
        outputs.append(np.asarray(forward(tf.constant(chunk)))[:real])
    return np.concatenate(outputs).astype(np.float32, copy=False)
