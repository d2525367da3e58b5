"""Tiny Keras models for the explanation tests, with weights set from a seeded numpy generator.

Imported by the tests as `_models` (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import numpy as np


def randomize(model, seed: int, scale: float = 0.5):
    """Give every weight of `model` seeded N(0, scale^2) values; returns the model."""
    rng = np.random.default_rng(seed)
    model.set_weights([scale * rng.standard_normal(w.shape) for w in model.get_weights()])
    return model


def tanh_convnet(*, classes: int = 4, last: str = "softmax", dtype: str = "float32", seed: int = 0):
    """(6, 6, 2) -> Conv2D(3, 3x3, tanh) -> Flatten -> Dense(classes, last): smooth everywhere."""
    import keras

    return randomize(
        keras.Sequential(
            [
                keras.Input((6, 6, 2), dtype=dtype),
                keras.layers.Conv2D(3, 3, activation="tanh", dtype=dtype),
                keras.layers.Flatten(dtype=dtype),
                keras.layers.Dense(classes, activation=last, dtype=dtype),
            ]
        ),
        seed,
    )


def relu_net(seed: int = 1, *, relu_layers: bool = False):
    """(5, 5, 1) -> Conv2D(3, 2x2, relu) -> Flatten -> Dense(6, relu) -> Dense(3, softmax).

    relu_layers=True applies the two ReLUs as a `ReLU()` layer and an `Activation("relu")`
    layer instead of `activation="relu"`; the function computed is the same.
    """
    import keras

    if relu_layers:
        layers = [
            keras.layers.Conv2D(3, 2, name="conv"),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(6, name="hidden"),
            keras.layers.Activation("relu"),
        ]
    else:
        layers = [
            keras.layers.Conv2D(3, 2, activation="relu", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(6, activation="relu", name="hidden"),
        ]
    head = keras.layers.Dense(3, activation="softmax", name="head")
    return randomize(keras.Sequential([keras.Input((5, 5, 1)), *layers, head]), seed)


def cam_net(*, units: int = 3, last: str = "softmax", channels: int = 1, seed: int = 2):
    """(8, 8, channels) -> Conv2D(4, 3x3, relu, 'conv') -> GlobalAveragePooling2D -> Dense(units).

    The architecture CAM (Zhou et al. 2016) is defined on.
    """
    import keras

    return randomize(
        keras.Sequential(
            [
                keras.Input((8, 8, channels)),
                keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(units, activation=last, name="head"),
            ]
        ),
        seed,
    )


def two_conv_functional(*, channels: int = 1, seed: int = 3):
    """Functional: (8, 8, C) -> conv_a (relu) -> conv_b (tanh) -> Flatten -> Dense(3, softmax)."""
    import keras

    inputs = keras.Input((8, 8, channels))
    a = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a")(inputs)
    b = keras.layers.Conv2D(3, 3, activation="tanh", name="conv_b")(a)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(keras.layers.Flatten()(b))
    return randomize(keras.Model(inputs, outputs), seed)


def sequential_without_input(seed: int = 4):
    """A Sequential with no Input layer, built the way users do it: by calling it once (batch 1)."""
    import keras

    model = keras.Sequential(
        [
            keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model(np.zeros((1, 8, 8, 1), np.float32))
    return randomize(model, seed)


QUADRANT_SIZE, QUADRANT_HALF = 12, 6  # quadrant_reader's image side and quadrant side


def quadrant_reader(quadrants: tuple[tuple[int, int], ...] = ((0, 0), (0, 0)), seed: int = 0):
    """(12, 12, 1) -> Conv2D 1x1 (relu) -> Flatten -> Dense(8, relu) -> Dense(2, softmax).

    Hidden units 4k .. 4k + 3 sum relu(x) over quadrant quadrants[k] (positive weights, 0
    elsewhere) and logit k is their mean. With both classes on the top-left quadrant the model
    sees nothing else. Eight hidden units: once they are randomized some stay active, so the
    randomized gradient is not zero.
    """
    import keras

    model = keras.Sequential([
        keras.Input((QUADRANT_SIZE, QUADRANT_SIZE, 1)),
        keras.layers.Conv2D(1, 1, activation="relu", name="conv"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(8, activation="relu", name="hidden"),
        keras.layers.Dense(2, activation="softmax", name="head"),
    ])
    size, half = QUADRANT_SIZE, QUADRANT_HALF
    rng = np.random.default_rng(seed)
    hidden = np.zeros((size, size, 8))
    head = np.zeros((8, 2))
    for k, (row, col) in enumerate(quadrants):
        rows, cols = slice(row * half, (row + 1) * half), slice(col * half, (col + 1) * half)
        hidden[rows, cols, 4 * k : 4 * k + 4] = rng.uniform(0.5, 1.5, (half, half, 4))
        head[4 * k : 4 * k + 4, k] = 0.3 / 4
    model.set_weights([
        np.ones((1, 1, 1, 1)), np.zeros(1),
        hidden.reshape(size * size, 8), np.zeros(8),
        head, np.zeros(2),
    ])
    return model


def images(count: int, shape: tuple, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) float32 images (count, *shape)."""
    return np.random.default_rng(seed).random((count, *shape), dtype=np.float32)


def snapshot(model) -> tuple:
    """What must not change when a model is explained: weights and every layer's activation."""
    activations = [getattr(layer, "activation", None) for layer in model.layers]
    return [w.copy() for w in model.get_weights()], activations


def assert_unchanged(model, before: tuple) -> None:
    weights, activations = before
    after_weights, after_activations = snapshot(model)
    assert len(weights) == len(after_weights)
    for old, new in zip(weights, after_weights):
        np.testing.assert_array_equal(old, new)
    assert all(a is b for a, b in zip(activations, after_activations))


def tiny_digits_config(name: str, *, seed: int, epochs: int, dropout: float, **train) -> dict:
    """A raw config that trains in about a second: digits at 8x8, one 4-filter conv, dropout
    (random masks that a resumed run must repeat)."""
    return {
        "name": name,
        "seed": seed,
        "data": {"source": "digits"},
        "model": {"layers": [
            {"type": "conv2d", "filters": 4, "kernel": 3, "padding": "same", "name": "conv"},
            {"type": "max_pool2d", "pool": 2, "name": "pool"},
            {"type": "flatten", "name": "flat"},
            {"type": "dropout", "rate": dropout, "name": "drop"},
        ]},
        "train": {"epochs": epochs, "batch_size": 64, **train},
    }
