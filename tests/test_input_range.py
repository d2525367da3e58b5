"""DECISIONS D1: a model that begins with its preprocessing layers takes 8-bit pixels, and every
explanation gives the same answer as for the same network fed [0, 1] images."""

from __future__ import annotations

import numpy as np
import pytest
from _models import cam_net, images

from cnnviz.explain import (
    CAM_METHODS,
    activation_maximization_batch,
    cam,
    gradcam,
    gradient_x_input,
    integrated_gradients,
    occlusion,
    rise,
    saliency,
)
from cnnviz.model.inputs import input_range


def _with_rescaling(model, scale: float = 1 / 255):
    """The same network behind a Rescaling(scale) input layer: 1/255 takes 8-bit pixels."""
    import keras

    pixels = keras.Sequential([keras.Input(model.inputs[0].shape[1:]),
                               keras.layers.Rescaling(scale),
                               *[layer.__class__.from_config(layer.get_config())
                                 for layer in model.layers]])
    pixels.set_weights(model.get_weights())
    return pixels


def test_input_range_reads_the_first_layer():
    import keras

    def model(*first, shape=(4, 4, 1)):
        return keras.Sequential([keras.Input(shape), *first, keras.layers.Flatten()])

    assert input_range(model(keras.layers.Rescaling(1 / 255))) == (0.0, 255.0)
    assert input_range(model(keras.layers.Rescaling(1 / 127.5, offset=-1))) == (0.0, 255.0)
    assert input_range(
        model(keras.layers.Normalization(mean=100.0, variance=900.0))) == (0.0, 255.0)
    assert input_range(model(keras.layers.Rescaling(1 / 9))) == (0.0, 9.0)
    assert input_range(model()) == (0.0, 1.0)
    inputs = keras.Input((4, 4, 1))
    nested = keras.Model(
        inputs, keras.layers.Dense(2)(model(keras.layers.Rescaling(1 / 255))(inputs)))
    assert input_range(nested) == (0.0, 255.0), "preprocessing inside a nested first model"


def test_every_method_explains_8_bit_pixels_as_it_explains_unit_images():
    unit_model = cam_net(channels=3)
    pixel_model = _with_rescaling(unit_model)
    unit = images(4, (8, 8, 3), seed=1)
    pixels = unit * 255.0
    np.testing.assert_allclose(pixel_model.predict(pixels, verbose=0),
                               unit_model.predict(unit, verbose=0), atol=1e-6)

    np.testing.assert_allclose(gradcam(pixel_model, pixels), gradcam(unit_model, unit), atol=1e-5)
    for method in ("vanilla", "guided", "smoothgrad"):  # d/d(pixel) = d/d(unit) / 255
        np.testing.assert_allclose(saliency(pixel_model, pixels, method=method) * 255,
                                   saliency(unit_model, unit, method=method), rtol=1e-3,
                                   atol=1e-6)
    # The patch is mid-grey in both: 0.5 of [0, 1], 127.5 of [0, 255].
    np.testing.assert_allclose(occlusion(pixel_model, pixels, patch=3).probability,
                               occlusion(unit_model, unit, patch=3).probability, atol=1e-5)
    for method in CAM_METHODS:  # Score-CAM masks to the low end of each range
        np.testing.assert_allclose(cam(pixel_model, pixels, method=method),
                                   cam(unit_model, unit, method=method), atol=1e-4,
                                   err_msg=method)
    np.testing.assert_allclose(rise(pixel_model, pixels, masks=200, cell=4, seed=1),
                               rise(unit_model, unit, masks=200, cell=4, seed=1), atol=1e-5)
    # Signed attributions are per input value: gradient x input is unit-free.
    np.testing.assert_allclose(gradient_x_input(pixel_model, pixels),
                               gradient_x_input(unit_model, unit), rtol=1e-3, atol=1e-6)
    for baseline in (0.0, "blur"):
        np.testing.assert_allclose(
            integrated_gradients(pixel_model, pixels, baseline=baseline, steps=16),
            integrated_gradients(unit_model, unit, baseline=baseline, steps=16),
            rtol=1e-3, atol=1e-6)


def test_occlusion_fills_the_patch_with_its_share_of_the_input_range():
    """A model taking 0..9: fill 0 hides a window with 0, 0.5 with 4.5, 1 with 9. Each window's
    probability is the model's on the image with that window set to that value, computed here."""
    model = _with_rescaling(cam_net(channels=1), 1 / 9)
    assert input_range(model) == (0.0, 9.0)
    batch = images(3, (8, 8, 1), seed=3) * 9.0
    predicted = model.predict(batch, verbose=0).argmax(axis=1)
    found = {}
    for fill, value in ((0.0, 0.0), (0.5, 4.5), (1.0, 9.0)):
        result = occlusion(model, batch, patch=4, fill=fill)  # windows at 0 and 4: a 2 x 2 grid
        np.testing.assert_array_equal(result.targets, predicted)
        expected = np.empty((3, 2, 2))
        for i, top in enumerate((0, 4)):
            for j, left in enumerate((0, 4)):
                hidden = batch.copy()
                hidden[:, top:top + 4, left:left + 4] = value
                expected[:, i, j] = model.predict(hidden, verbose=0)[np.arange(3), predicted]
        np.testing.assert_allclose(result.window_probability, expected, atol=1e-6,
                                   err_msg=f"fill {fill}")
        found[fill] = expected
    # The three fills are told apart: a patch of 0 (or of the fill itself, 0.5) would not pass.
    assert np.abs(found[0.5] - found[0.0]).min() > 1e-4
    assert np.abs(found[0.5] - found[1.0]).min() > 1e-4


def test_activation_maximization_climbs_the_same_way_in_8_bit_units():
    unit_model = cam_net(channels=1)
    pixel_model = _with_rescaling(unit_model)
    settings = {"steps": 24, "seed": 3}
    in_unit = activation_maximization_batch(unit_model, None, (0, 2), **settings)
    in_pixels = activation_maximization_batch(pixel_model, None, (0, 2), **settings)
    assert in_pixels.min() >= 0.0 and in_pixels.max() <= 255.0
    assert in_pixels.max() > 2.0, "the climb uses the 0..255 range"
    np.testing.assert_allclose(in_pixels / 255.0, in_unit, atol=2e-3)


@pytest.mark.slow
def test_a_trained_cnnviz_model_takes_8_bit_pixels(digits_run):
    import json

    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert metrics["input_range"] == [0.0, 255.0]
    assert metrics["preprocessing"]["divisor"] == 255.0
