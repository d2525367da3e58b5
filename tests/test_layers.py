"""filters and feature_maps: kernels read back exactly, maps equal a hand-computed convolution."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cnnviz.errors import CnnvizError
from cnnviz.explain.layers import feature_maps, filters

RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(0.0, 1.0, size=(7, 6, 6, 1)).astype(np.float32)
KERNEL = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], np.float32)  # Sobel x
BIAS = 0.25


def _one_filter_model() -> keras.Model:
    """Input 6x6x1 -> Conv2D(1 filter, 3x3, valid, relu) with the Sobel kernel and a known bias."""
    inputs = keras.Input((6, 6, 1))
    conv = keras.layers.Conv2D(1, 3, activation="relu", name="sobel")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(conv)
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(pooled)
    model = keras.Model(inputs, outputs)
    model.get_layer("sobel").set_weights([KERNEL[:, :, None, None], np.array([BIAS], np.float32)])
    return model


def _numpy_conv_relu(images: np.ndarray) -> np.ndarray:
    """Valid cross-correlation + bias + ReLU, one output pixel at a time (the textbook loop)."""
    count, height, width, _ = images.shape
    out = np.zeros((count, height - 2, width - 2, 1), np.float32)
    for n in range(count):
        for i in range(height - 2):
            for j in range(width - 2):
                out[n, i, j, 0] = np.sum(images[n, i : i + 3, j : j + 3, 0] * KERNEL) + BIAS
    return np.maximum(out, 0.0)


def _two_conv_sequential(called: bool) -> keras.Sequential:
    """A Sequential model without an explicit Input, built by calling it or by `build`."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="conv2"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(3, activation="softmax", name="head"),
        ]
    )
    if called:
        model(IMAGES[:1])
    else:
        model.build((None, 6, 6, 1))
    return model


def test_filters_equal_layer_weights_by_name_and_by_object():
    model = _two_conv_sequential(called=True)
    expected = model.get_layer("conv2").get_weights()[0]
    by_name = filters(model, "conv2")
    by_object = filters(model, model.get_layer("conv2"))
    assert by_name.dtype == np.float32
    assert by_name.shape == (3, 3, 4, 5)  # (kh, kw, in_channels, filters)
    np.testing.assert_array_equal(by_name, expected)
    np.testing.assert_array_equal(by_object, expected)


def test_filters_of_the_hand_set_layer_are_the_sobel_kernel():
    np.testing.assert_array_equal(filters(_one_filter_model(), "sobel")[:, :, 0, 0], KERNEL)


@pytest.mark.parametrize("layer", ["head", "pool"])
def test_filters_of_a_non_conv_layer_lists_the_conv_layers(layer):
    with pytest.raises(CnnvizError, match=rf"'{layer}'.*Layers with kernels: conv1, conv2"):
        filters(_two_conv_sequential(called=True), layer)


def test_unknown_layer_name_is_quoted_and_layers_listed():
    with pytest.raises(CnnvizError, match=r"no layer named 'conv9'.*conv1, pool, conv2"):
        filters(_two_conv_sequential(called=True), "conv9")


def test_layer_of_another_model_is_rejected():
    with pytest.raises(CnnvizError, match="is not a layer of model"):
        feature_maps(_one_filter_model(), IMAGES, _two_conv_sequential(True).get_layer("conv1"))


def test_feature_maps_equal_numpy_convolution_on_hand_set_model():
    maps = feature_maps(_one_filter_model(), IMAGES, "sobel")
    assert maps.shape == (7, 4, 4, 1) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, _numpy_conv_relu(IMAGES), atol=1e-5)
    assert (maps > 0).any() and (maps == 0).any()  # the ReLU cut both ways: a real check


@pytest.mark.parametrize("called", [True, False], ids=["called", "built"])
def test_feature_maps_equal_keras_submodel_on_sequential_without_input(called):
    model = _two_conv_sequential(called)
    for name, shape in [("conv1", (7, 6, 6, 4)), ("pool", (7, 3, 3, 4)), ("conv2", (7, 3, 3, 5))]:
        layer = model.get_layer(name)
        expected = keras.Model(model.inputs[0], layer.output)(IMAGES).numpy()
        maps = feature_maps(model, IMAGES, layer)
        assert maps.shape == shape
        np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)


def test_chunked_and_padded_batches_equal_one_batch():
    model = _two_conv_sequential(called=True)
    whole = feature_maps(model, IMAGES, "conv2", batch_size=256)
    chunked = feature_maps(model, IMAGES, "conv2", batch_size=3)  # 3 + 3 + 1 (padded)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)


def test_single_image_gets_a_batch_axis():
    maps = feature_maps(_one_filter_model(), IMAGES[0], "sobel")
    np.testing.assert_allclose(maps, _numpy_conv_relu(IMAGES[:1]), atol=1e-5)


@pytest.mark.parametrize("layer", ["flat", "head"])
def test_feature_maps_of_a_non_4d_layer_lists_the_4d_layers(layer):
    with pytest.raises(CnnvizError, match=rf"'{layer}' has no 4-D output.*conv1, pool, conv2"):
        feature_maps(_two_conv_sequential(called=True), IMAGES, layer)


def test_models_weights_are_unchanged():
    model = _two_conv_sequential(called=True)
    before = [w.copy() for w in model.get_weights()]
    feature_maps(model, IMAGES, "conv2")
    filters(model, "conv1")
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
