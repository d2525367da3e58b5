"""Config -> Keras model, and the optimizer/loss it trains with.

Layers get stable names from the config (`conv2d_1`, `conv2d_2`, ...) unless named there, so
`--layer conv2d_2` means the same layer in every process (`cnnviz.config.layer_names`).
"""

from __future__ import annotations

from cnnviz.config.loading import (
    BackboneConfig,
    BatchNormLayer,
    Config,
    Conv2DLayer,
    DenseLayer,
    DropoutLayer,
    FlattenLayer,
    PoolLayer,
    layer_names,
    run_slug,
)
from cnnviz.errors import CnnvizError


def _keras_layer(spec, name: str):
    import keras

    if isinstance(spec, Conv2DLayer):
        return keras.layers.Conv2D(
            spec.filters, spec.kernel, strides=spec.stride, padding=spec.padding,
            activation=spec.activation, name=name,
        )
    if isinstance(spec, PoolLayer):
        pool_class = keras.layers.MaxPooling2D if spec.type == "max_pool2d" else keras.layers.AveragePooling2D
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
    sources) and a saved model explains image files without anything else (DECISIONS D1).

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

    from cnnviz.config.loading import check_layer_shapes
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
    head = [_keras_layer(spec, name) for spec, name in zip(config.model.layers, layer_names(config.model.layers))]
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


def _layerwise(optimizer_class):
    """`optimizer_class` with a smaller learning rate for some layers' variables.

    Keras 3 has no per-variable learning rate; every optimizer's `update_step(grad, var, lr)` is
    called per variable, so scaling `lr` there is exact for SGD, Adam and RMSprop alike
    (scaling the gradient instead would do nothing under Adam, which is scale-invariant).
    """
    import keras

    class Layerwise(optimizer_class):
        def __init__(self, *args, slow_layers=(), slow_multiplier=1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.slow_layers = tuple(slow_layers)
            self.slow_multiplier = float(slow_multiplier)
            self._slow_keys: set = set()

        def build(self, variables):
            # update_step receives backend variables without Keras paths: remember the keys.
            super().build(variables)
            slow = set(self.slow_layers)
            self._slow_keys = {self._var_key(variable) for variable in variables
                               if variable.path.split("/")[0] in slow}

        def update_step(self, gradient, variable, learning_rate):
            if self._var_key(variable) in self._slow_keys:
                learning_rate = learning_rate * self.slow_multiplier
            return super().update_step(gradient, variable, learning_rate)

        def get_config(self):
            return {**super().get_config(), "slow_layers": list(self.slow_layers),
                    "slow_multiplier": self.slow_multiplier}

    Layerwise.__name__ = f"Layerwise{optimizer_class.__name__}"
    return keras.saving.register_keras_serializable("cnnviz")(Layerwise)


_LAYERWISE: dict = {}


def learning_rate(config: Config, steps_per_epoch: int = 1):
    """`train.optimizer.learning_rate`, or a keras.optimizers.schedules schedule of it.

    Schedules count optimizer steps; the config counts epochs of `steps_per_epoch` steps.
    `plateau` is a callback (ReduceLROnPlateau, see train.py), so its rate starts constant.
    """
    import keras

    spec = config.train.optimizer
    schedule, rate = spec.schedule, spec.learning_rate
    steps = max(1, int(steps_per_epoch))
    if schedule is None or schedule.type == "plateau":
        return rate
    if schedule.type == "cosine":
        warmup = round(schedule.warmup_epochs * steps)
        decay = max(1, config.train.epochs * steps - warmup)
        alpha = min(1.0, schedule.min_learning_rate / rate)
        if warmup == 0:
            return keras.optimizers.schedules.CosineDecay(rate, decay, alpha=alpha)
        return keras.optimizers.schedules.CosineDecay(0.0, decay, alpha=alpha,
                                                      warmup_target=rate, warmup_steps=warmup)
    if schedule.type == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            rate, max(1, round(schedule.decay_epochs * steps)), schedule.decay_rate,
            staircase=schedule.staircase)
    drops = range(schedule.every_epochs, config.train.epochs, schedule.every_epochs)
    if not drops:
        return rate
    # PiecewiseConstantDecay keeps the old value AT a boundary: end each stretch one step
    # early, so the epoch's first step already has its new rate.
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [epoch * steps - 1 for epoch in drops],
        [rate * schedule.factor ** count for count in range(len(drops) + 1)])


def make_optimizer(config: Config, slow_layers: set[str] = frozenset(), steps_per_epoch: int = 1):
    """The configured optimizer; backbone layers (`slow_layers`) learn at a reduced rate."""
    import keras

    spec = config.train.optimizer
    base = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD,
            "rmsprop": keras.optimizers.RMSprop}[spec.name]
    kwargs = {"learning_rate": learning_rate(config, steps_per_epoch)}
    if spec.name in ("sgd", "rmsprop"):
        kwargs["momentum"] = spec.momentum
    if not slow_layers:
        return base(**kwargs)
    if base not in _LAYERWISE:
        _LAYERWISE[base] = _layerwise(base)
    return _LAYERWISE[base](
        slow_layers=sorted(slow_layers),
        slow_multiplier=config.model.backbone.learning_rate_multiplier, **kwargs,
    )


def loss_name(config: Config) -> str:
    """The Keras loss for the config: integer labels in both cases."""
    if config.model.output.activation == "sigmoid":
        return "binary_crossentropy"
    return "sparse_categorical_crossentropy"


def one_hot_labels(config: Config) -> bool:
    """Label smoothing needs one-hot targets: Keras's sparse cross-entropy has no smoothing."""
    return config.train.label_smoothing > 0 and config.model.output.activation != "sigmoid"


def make_loss(config: Config):
    """The loss object: `loss_name`'s, or the smoothed cross-entropy (`train.label_smoothing`)."""
    import keras

    smoothing = config.train.label_smoothing
    if not smoothing:
        return loss_name(config)
    if config.model.output.activation == "sigmoid":
        return keras.losses.BinaryCrossentropy(label_smoothing=smoothing)
    return keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)


def compile_model(model, config: Config, *, steps_per_epoch: int = 1) -> None:
    """Compile `model` for training as the config's `train` section says.

    `steps_per_epoch` converts a learning-rate schedule's epochs into optimizer steps.
    """
    metrics = []
    for metric in config.train.metrics:
        if metric == "accuracy":
            metrics.append("accuracy")
        else:
            import keras

            if config.model.output.activation != "sigmoid":
                raise CnnvizError(
                    f"train.metrics {metric!r} needs a sigmoid (binary) output; use accuracy"
                )
            metrics.append({"auc": keras.metrics.AUC, "precision": keras.metrics.Precision,
                            "recall": keras.metrics.Recall}[metric](name=metric))
    model.compile(
        optimizer=make_optimizer(config, backbone_layer_names(model, config), steps_per_epoch),
        loss=make_loss(config),
        metrics=metrics,
        jit_compile=config.train.jit_compile,
    )
