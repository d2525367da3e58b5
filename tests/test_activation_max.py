"""Activation maximization: the optimized images really maximize what they claim to."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnnviz.errors import CnnvizError
from cnnviz.explain.activation_max import (
    _gaussian_blur,
    activation_maximization,
    activation_maximization_batch,
    l2_norm,
    lp_norm,
    total_variation,
)

CLASSES = 10


@pytest.fixture(scope="module")
def digits_model() -> keras.Model:
    """A small CNN trained for a few seconds on scikit-learn's 8x8 digits (about 90% accuracy)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(CLASSES, activation="softmax", name="head"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(images, digits.target, epochs=8, batch_size=64, verbose=0)
    assert history.history["accuracy"][-1] > 0.8  # otherwise the tests below prove nothing
    return model


@pytest.fixture(scope="module")
def digits_class_images(digits_model) -> np.ndarray:
    return activation_maximization_batch(digits_model, None, range(CLASSES), seed=0)


def _all_positive_filter_model() -> keras.Model:
    """8x8x1 -> Conv2D(1, 3x3, valid, relu) with every weight 0.1: the maximum is an all-ones image
    (mean activation 0.9 = 9 * 0.1 * 1.0)."""
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(1, 3, activation="relu", name="blob")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(conv))
    model = keras.Model(inputs, outputs)
    model.get_layer("blob").set_weights([np.full((3, 3, 1, 1), 0.1, np.float32), np.zeros(1)])
    return model


@pytest.mark.slow
def test_each_class_image_is_predicted_as_its_class(digits_model, digits_class_images):
    assert digits_class_images.shape == (CLASSES, 8, 8, 1)
    assert digits_class_images.dtype == np.float32
    predicted = digits_model.predict(digits_class_images, verbose=0).argmax(axis=1)
    wrong = {c: int(p) for c, p in enumerate(predicted) if p != c}
    assert not wrong, (
        f"activation-max images predicted as another class {{class: predicted}}: {wrong}"
    )


@pytest.mark.slow
def test_class_images_stay_inside_the_input_range(digits_class_images):
    assert digits_class_images.min() >= 0.0 and digits_class_images.max() <= 1.0
    assert digits_class_images.std() > 0.1  # a pattern, not the starting grey


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_filter_image_excites_its_filter_more_than_any_noise_image(digits_model, layer):
    feature_model = keras.Model(digits_model.inputs[0], digits_model.get_layer(layer).output)
    # Full-range uniform noise is a strong baseline for 3x3 / 5x5 receptive fields on 8x8 images.
    noise = np.random.default_rng(1).uniform(0, 1, (64, 8, 8, 1)).astype(np.float32)
    noise_means = feature_model(noise).numpy().mean(axis=(1, 2))  # (64 images, filters)
    live = np.flatnonzero(noise_means.mean(axis=0) > 1e-3)  # dead ReLU filters cannot be excited
    assert len(live) >= 4
    images = activation_maximization_batch(digits_model, layer, live)
    optimized = feature_model(images).numpy().mean(axis=(1, 2))[np.arange(len(live)), live]
    versus_mean = optimized / noise_means.mean(axis=0)[live]
    versus_best = optimized / noise_means.max(axis=0)[live]
    assert (versus_mean > 1.4).all(), f"optimized / mean noise activation: {versus_mean.round(2)}"
    assert (versus_best > 1.2).all(), f"optimized / best of 64 noise: {versus_best.round(2)}"


def test_all_positive_filter_reaches_its_known_maximum():
    image = activation_maximization(_all_positive_filter_model(), "blob", 0, regularizers=())
    np.testing.assert_allclose(image, 1.0, atol=1e-6)  # every pixel pushed to the top of the range


@pytest.mark.slow
def test_same_seed_same_image_other_seed_other_image(digits_model):
    first = activation_maximization(digits_model, None, 3, steps=32, seed=7)
    again = activation_maximization(digits_model, None, 3, steps=32, seed=7)
    other = activation_maximization(digits_model, None, 3, steps=32, seed=8)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-2


@pytest.mark.slow
def test_batch_equals_one_index_at_a_time(digits_model, digits_class_images):
    for index in (2, 7):
        single = activation_maximization(digits_model, "head", index, seed=0)
        np.testing.assert_allclose(single, digits_class_images[index], atol=1e-3)


@pytest.mark.slow
def test_chunked_batch_equals_one_batch(digits_model):
    whole = activation_maximization_batch(digits_model, "conv2", (0, 5, 9), steps=32)
    chunked = activation_maximization_batch(
        digits_model, "conv2", (0, 5, 9), steps=32, batch_size=2
    )
    np.testing.assert_allclose(chunked, whole, atol=1e-4)


@pytest.mark.slow
def test_users_model_is_unchanged(digits_model):
    probe = np.random.default_rng(2).uniform(0, 1, (4, 8, 8, 1)).astype(np.float32)
    weights = [w.copy() for w in digits_model.get_weights()]
    outputs = digits_model(probe).numpy()
    activation_maximization(digits_model, None, 1, steps=8)
    activation_maximization(digits_model, "conv2", 1, steps=8)
    for old, new in zip(weights, digits_model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(digits_model(probe).numpy(), outputs)  # softmax still there
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, atol=1e-5)


def test_regularizers_compose_as_weighted_penalties():
    model = _all_positive_filter_model()
    free = activation_maximization(model, "blob", 0, steps=64, regularizers=())
    # A strong L2 weight outweighs the unit-RMS score gradient: pixels are pulled down to 0.
    shrunk = activation_maximization(model, "blob", 0, steps=64, regularizers=((5.0, l2_norm),))
    assert free.mean() > 0.99 and shrunk.mean() < 0.2


def test_penalties_match_numpy():
    images = np.random.default_rng(3).normal(size=(2, 5, 4, 3)).astype(np.float32)
    tensor = tf.constant(images)
    np.testing.assert_allclose(l2_norm(tensor), (images**2).sum(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(lp_norm(2)(tensor), l2_norm(tensor), rtol=1e-4)
    np.testing.assert_allclose(
        lp_norm(3)(tensor), (np.abs(images) ** 3).sum(axis=(1, 2, 3)), rtol=1e-4
    )
    variation = np.abs(np.diff(images, axis=1)).sum(axis=(1, 2, 3)) + np.abs(
        np.diff(images, axis=2)
    ).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(total_variation(tensor), variation, rtol=1e-5)


def test_blur_keeps_constant_images_and_total_mass():
    blur = _gaussian_blur(1.0, (9, 9, 2))
    constant = tf.fill((1, 9, 9, 2), 0.3)
    np.testing.assert_allclose(blur(constant), 0.3, atol=1e-6)  # reflected borders: no darkening
    impulse = np.zeros((1, 9, 9, 2), np.float32)
    impulse[0, 4, 4, :] = 1.0
    blurred = blur(tf.constant(impulse)).numpy()
    np.testing.assert_allclose(blurred.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert blurred[0, 4, 4, 0] < 0.5 and blurred[0, 4, 5, 0] > 0.05


def test_binary_sigmoid_model_maximizes_either_class():
    inputs = keras.Input((4, 4, 1))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs)
    weights = np.linspace(-1, 1, 16, dtype=np.float32).reshape(16, 1)
    model.layers[-1].set_weights([weights, np.zeros(1, np.float32)])
    images = activation_maximization_batch(model, None, (0, 1), steps=64, regularizers=())
    probabilities = model(images).numpy()[:, 0]
    assert probabilities[0] < 0.05 and probabilities[1] > 0.95


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layer", "index", "settings", "message"),
    [
        (None, 10, {}, r"index 10 is out of range; valid indices are 0\.\.9"),
        ("conv2", 16, {}, r"index 16 is out of range; valid indices are 0\.\.15"),
        ("conv9", 0, {}, r"no layer named 'conv9'"),
        (None, 0, {"steps": -1}, r"steps must be at least 0 \(0: the starting image\)"),
        (None, 0, {"input_range": (1.0, 0.0)}, r"low < high; received \(1\.0, 0\.0\)"),
        (None, 0, {"jitter": -1}, r"jitter must be >= 0"),
    ],
)
def test_bad_arguments_raise_cnnviz_error(digits_model, layer, index, settings, message):
    with pytest.raises(CnnvizError, match=message):
        activation_maximization(digits_model, layer, index, **settings)


def test_lp_norm_rejects_non_positive_p():
    with pytest.raises(CnnvizError, match="p > 0; received p=0"):
        lp_norm(0)
