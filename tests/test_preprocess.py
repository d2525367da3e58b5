"""--preprocess and --resize: Keras's own preprocess_input and Resizing are the references."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cnnviz.data.images import resize_pixels
from cnnviz.errors import CnnvizError
from cnnviz.model.inputs import prepare, resolve_mode, to_pixels, value_range

PIXELS = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3)).astype(np.float32)


@pytest.mark.parametrize("mode, keras_mode", [("unit", "tf"), ("caffe", "caffe"),
                                              ("torch", "torch")])
def test_modes_equal_keras_preprocess_input(mode, keras_mode):
    expected = keras.applications.imagenet_utils.preprocess_input(PIXELS.copy(), mode=keras_mode)
    np.testing.assert_allclose(prepare(PIXELS, mode), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", ["scale", "unit", "caffe", "torch", "none"])
def test_to_pixels_undoes_prepare_and_the_range_holds_every_pixel(mode):
    prepared = prepare(PIXELS, mode)
    np.testing.assert_allclose(to_pixels(prepared, mode), PIXELS, atol=1e-3)
    low, high = value_range(mode)
    assert low <= prepared.min() and prepared.max() <= high


def test_scale_and_unit_ranges():
    assert value_range("scale") == (0.0, 1.0) and value_range("unit") == (-1.0, 1.0)
    assert value_range("none") == (0.0, 255.0)


def test_auto_is_raw_pixels_for_a_model_that_rescales_itself_else_scale_with_a_note():
    rescaling = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Rescaling(1 / 127.5, -1),
                                  keras.layers.Flatten(), keras.layers.Dense(2)])
    assert resolve_mode(rescaling, "auto") == ("none", None)
    inputs = keras.Input((4, 4, 3))
    nested = keras.Model(inputs, rescaling(inputs))  # Rescaling first inside a nested model
    assert resolve_mode(nested, "auto") == ("none", None)
    plain = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    mode, note = resolve_mode(plain, "auto")
    assert mode == "scale" and "divided by 255" in note and "--preprocess" in note
    assert resolve_mode(plain, "caffe") == ("caffe", None)


def test_bad_modes_and_gray_images_for_rgb_modes_are_refused():
    with pytest.raises(CnnvizError, match=r"--preprocess 'tf' is not a mode; choose one of auto"):
        prepare(PIXELS, "tf")
    with pytest.raises(CnnvizError, match=r"caffe needs RGB images"):
        prepare(PIXELS[..., :1], "caffe")
    with pytest.raises(CnnvizError, match=r"--resize 'fit' is not a mode"):
        resize_pixels(PIXELS[0], (4, 4), "fit")


def test_crop_is_kerass_smart_resize_and_stretch_ignores_the_aspect_ratio():
    wide = np.random.default_rng(1).uniform(0, 255, (6, 12, 3)).astype(np.float32)
    cropped = resize_pixels(wide, (6, 6), "crop")
    np.testing.assert_allclose(cropped, wide[:, 3:9], atol=1e-4)  # centre window, no scaling
    np.testing.assert_allclose(
        cropped, keras.preprocessing.image.smart_resize(wide, (6, 6)), atol=1e-4)
    assert resize_pixels(wide, (6, 6), "stretch").shape == (6, 6, 3)


def test_pad_adds_centred_black_borders():
    wide = np.full((4, 8, 3), 200.0, np.float32)
    padded = resize_pixels(wide, (8, 8), "pad")  # 4 x 8 -> 8 x 8: two black rows each side
    np.testing.assert_allclose(padded[:2], 0.0)
    np.testing.assert_allclose(padded[-2:], 0.0)
    np.testing.assert_allclose(padded[2:6], 200.0)
