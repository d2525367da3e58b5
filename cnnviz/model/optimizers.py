"""Optimizer (with per-layer learning-rate multipliers), loss and compile step for a configured
model."""

from __future__ import annotations

from cnnviz._keras import variable_key
from cnnviz.config.root import Config
from cnnviz.errors import CnnvizError
from cnnviz.model.build import backbone_layer_names


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
            self._slow_keys = {variable_key(self, variable) for variable in variables
                               if variable.path.split("/")[0] in slow}

        def update_step(self, gradient, variable, learning_rate):
            if variable_key(self, variable) in self._slow_keys:
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
    `plateau` is a callback (ReduceLROnPlateau, see cnnviz.train.callbacks), so its rate starts
    constant.
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
        jit_compile=_jit_compile(config),
    )


def _jit_compile(config: Config) -> bool:
    import keras

    if config.train.jit_compile is not None:
        return config.train.jit_compile
    return keras.backend.backend() == "jax"
