"""Config -> Keras model, and the optimizer/loss it trains with.

Layers get stable names from the config (`conv2d_1`, `conv2d_2`, ...) unless named there, so
`--layer conv2d_2` means the same layer in every process (`cnnviz.config.layer_names`).
"""

from __future__ import annotations

from cnnviz.config.model import (
    BackboneConfig,
    BatchNormLayer,
    Conv2DLayer,
    DenseLayer,
    DropoutLayer,
    FlattenLayer,
    PoolLayer,
    layer_names,
)
from cnnviz.config.root import Config, run_slug
from cnnviz.errors import CnnvizError


def _keras_layer(spec, name: str):
    import keras

    if isinstance(spec, Conv2DLayer):
        return keras.layers.Conv2D(
            spec.filters, spec.kernel, strides=spec.stride, padding=spec.padding,
            activation=spec.activation, name=name,
        )
    if isinstance(spec, PoolLayer):
        pool_class = (keras.layers.MaxPooling2D if spec.type == "max_pool2d"
                      else keras.layers.AveragePooling2D)
        return pool_class(spec.pool, strides=spec.stride, padding=spec.padding, name=name)
    if isinstance(spec, DropoutLayer):
        return keras.layers.Dropout(spec.rate, name=name)
    if isinstance(spec, BatchNormLayer):
        return keras.layers.BatchNormalization(name=name)
    if isinstance(spec, FlattenLayer):
        if spec.type == "flatten":
            return keras.layers.Flatten(name=name)
        return keras.layers.GlobalAveragePooling2D(name=name)
    if isinstance(spec, DenseLayer):
        return keras.layers.Dense(spec.units, activation=spec.activation, name=name)
    raise CnnvizError(f"unsupported layer type {spec.type!r}")  # the config schema prevents this


def output_units(config: Config, num_classes: int) -> int:
    """Units of the output layer: one per class, or one sigmoid unit for two classes."""
    if config.model.output.activation == "sigmoid":
        if num_classes > 2:
            raise CnnvizError(
                f"model.output.activation 'sigmoid' is for two classes; the data has {num_classes}"
            )
        return 1
    return num_classes


def build_model(config: Config, input_shape: tuple[int, int, int], num_classes: int,
                preprocessing=None):
    """Build the (uncompiled) Keras model the config describes.

    The model begins with its preprocessing layers (Keras Rescaling, and Normalization for
    standardize/mean_subtract), so it takes the data's raw pixel values (8-bit units for image
    sources) and a saved model explains image files without anything else (docs/decisions.md D1).

    Args:
        config: a validated config.
        input_shape: (H, W, C) of one image.
        num_classes: classes in the data; sizes the output layer.
        preprocessing: a `cnnviz.data.Preprocessing` (with the training split's statistics);
            None: what the config asks for, statistics not yet measured (mean 0, std 1).

    Returns:
        A Sequential model, or a functional one when `model.backbone` is set (the backbone's
        layers are inlined so each can be inspected and explained).
    """
    import keras

    from cnnviz.config.shapes import check_layer_shapes
    from cnnviz.data import config_preprocessing

    if preprocessing is None:
        preprocessing = config_preprocessing(config)

    try:
        check_layer_shapes(config.model, tuple(input_shape))
    except ValueError as error:  # input shape known only now (npz, directory)
        raise CnnvizError(str(error)) from None

    if config.train.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    output = keras.layers.Dense(
        output_units(config, num_classes), activation=config.model.output.activation,
        name=config.model.output.name, dtype="float32",
    )
    head = [_keras_layer(spec, name)
            for spec, name in zip(config.model.layers, layer_names(config.model.layers))]
    name = run_slug(config.name)  # TensorFlow refuses spaces and most punctuation in a model name
    pixels = preprocessing.layers(input_shape[-1])
    if config.model.backbone is None:
        return keras.Sequential([keras.Input(tuple(input_shape)), *pixels, *head, output],
                                name=name)

    inputs = keras.Input(tuple(input_shape))
    scaled = inputs
    for layer in pixels:
        scaled = layer(scaled)
    backbone = _backbone(config.model.backbone, scaled, input_shape)
    taken = {layer.name for layer in backbone.layers} & {layer.name for layer in [*head, output]}
    if taken:
        raise CnnvizError(
            f"layer name(s) {', '.join(sorted(taken))} of model.layers/model.output are also "
            f"layers of the {config.model.backbone.name} backbone; choose other names"
        )
    features = backbone.output
    pooling = config.model.backbone.pooling
    features = {
        "avg": keras.layers.GlobalAveragePooling2D(name="backbone_avg_pool"),
        "max": keras.layers.GlobalMaxPooling2D(name="backbone_max_pool"),
        "flatten": keras.layers.Flatten(name="backbone_flatten"),
    }[pooling](features)
    for layer in head:
        features = layer(features)
    return keras.Model(inputs, output(features), name=name)


def _backbone(spec: BackboneConfig, inputs, input_shape):
    import keras

    if spec.weights == "imagenet" and input_shape[-1] != 3:
        raise CnnvizError(
            f"model.backbone.weights 'imagenet' needs 3-channel images; the data has "
            f"{input_shape[-1]} (use data.color_mode: rgb, or weights: null)"
        )
    application = getattr(keras.applications, spec.name)
    try:
        backbone = application(include_top=False, weights=spec.weights, input_tensor=inputs)
    except Exception as error:  # noqa: BLE001 - a failed weights download surfaces as many types
        raise CnnvizError(
            f"model.backbone {spec.name} with weights {spec.weights!r} could not be built: {error}"
        ) from None
    frozen = len(backbone.layers) - spec.trainable_layers
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= frozen
    return backbone


def backbone_layer_names(model, config: Config) -> set[str]:
    """Names of the reused (backbone) layers: everything before the pooling that meets the head."""
    if config.model.backbone is None:
        return set()
    names = [layer.name for layer in model.layers]
    pooling_index = next(i for i, name in enumerate(names) if name.startswith("backbone_"))
    return {name for name in names[1:pooling_index]}
