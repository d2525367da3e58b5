"""Activation maximization's parameterizations and transforms: the fft start is 1/f noise, the
default is pixel (what bench/feature_vis.py measured), the transforms are seeded and do what
they are named."""

import itertools

import numpy as np
import pytest
from _models import randomize

from cnnviz.errors import CnnvizError


def _rgb_net(side: int = 64):
    import keras

    return randomize(keras.Sequential([
        keras.Input((side, side, 3)), keras.layers.Conv2D(2, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)]), seed=0, scale=0.3)


def _power_slope(image: np.ndarray) -> float:
    """Slope of log mean power against log frequency, over log-spaced radial bins."""
    height, width = image.shape[:2]
    centred = image - image.mean(axis=(0, 1))
    power = (np.abs(np.fft.fft2(centred, axes=(0, 1))) ** 2).sum(axis=-1)
    fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
    frequency = np.sqrt(fy ** 2 + fx ** 2)
    edges = np.geomspace(2.0 / max(height, width), 0.5, 9)
    centres, means = [], []
    for low, high in itertools.pairwise(edges):
        inside = (frequency >= low) & (frequency < high)
        centres.append(np.sqrt(low * high))
        means.append(power[inside].mean())
    return float(np.polyfit(np.log(centres), np.log(means), 1)[0])


def test_fft_with_zero_steps_is_one_over_f_noise():
    from cnnviz.explain import activation_maximization_batch

    model = _rgb_net()
    fft = activation_maximization_batch(model, None, (0,), steps=0, param="fft",
                                        input_range=(0.0, 1.0))[0]
    pixel = activation_maximization_batch(model, None, (0,), steps=0, param="pixel",
                                          input_range=(0.0, 1.0))[0]
    # amplitude ~ 1/f, so power ~ 1/f^2; the pixel start is white noise (a flat spectrum)
    assert _power_slope(fft) == pytest.approx(-2.0, abs=0.25)
    assert _power_slope(pixel) == pytest.approx(0.0, abs=0.25)
    assert fft.shape == (64, 64, 3) and 0.45 < fft.min() and fft.max() < 0.55  # mid-grey


def test_pixel_is_the_default_at_every_size():
    # bench/feature_vis.py: pixel's class images transfer at least as well as fft's at 64 px RGB
    from cnnviz.explain import activation_maximization_batch
    from cnnviz.explain.parameterization import default_parameterization

    for shape in ((64, 64, 3), (224, 224, 3), (63, 200, 3), (128, 128, 1), (28, 28, 1)):
        assert default_parameterization(shape) == "pixel"
    model = _rgb_net()
    chosen = activation_maximization_batch(model, None, (0, 2), steps=3, seed=4)
    pixel = activation_maximization_batch(model, None, (0, 2), steps=3, seed=4, param="pixel")
    fft = activation_maximization_batch(model, None, (0, 2), steps=3, seed=4, param="fft")
    np.testing.assert_array_equal(chosen, pixel)
    assert not np.allclose(chosen, fft)


def test_transforms_are_seeded_and_change_the_ascent():
    from cnnviz.explain import activation_maximization_batch

    model = _rgb_net(32)
    every = ("pad", "jitter", "scale", "rotate")
    first = activation_maximization_batch(model, None, (1,), steps=6, transforms=every, seed=2)
    again = activation_maximization_batch(model, None, (1,), steps=6, transforms=every, seed=2)
    plain = activation_maximization_batch(model, None, (1,), steps=6, seed=2)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, plain)
    assert first.shape == (1, 32, 32, 3) and np.isfinite(first).all()


def test_each_transform_does_what_it_is_named():
    import keras

    from cnnviz.explain.transforms import _affine, _crop, random_transforms

    image = np.random.default_rng(0).uniform(0, 1, (1, 9, 9, 2)).astype(np.float32)
    tensor = keras.ops.convert_to_tensor(image)
    quarter = keras.ops.convert_to_numpy(_affine(tensor, 1.0, np.pi / 2))
    turned = np.rot90(image, k=1, axes=(1, 2))
    assert np.allclose(quarter, turned, atol=1e-5) or np.allclose(
        quarter, np.rot90(image, k=-1, axes=(1, 2)), atol=1e-5)
    # Zoom by 2 about the centre (4, 4): the output at 4 +- 2 reads the input at 4 +- 1.
    zoomed = keras.ops.convert_to_numpy(_affine(tensor, 2.0, 0.0))
    np.testing.assert_allclose(zoomed[:, 2:7:2, 2:7:2], image[:, 3:6, 3:6], atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(_affine(tensor, 1.0, 0.0)), image,
                               atol=1e-6)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(_crop(tensor, [1, 2], 3)),
                                  image[:, 1:7, 2:8])
    padded = random_transforms(("pad",), (9, 9, 2), 1, np.random.default_rng(0))
    assert padded(tensor, 0).shape == (1, 9, 9, 2)  # resized back to the input
    with pytest.raises(CnnvizError, match="transform 'spin' is unknown"):
        random_transforms(("spin",), (9, 9, 2), 1, np.random.default_rng(0))


def test_the_affine_read_is_keras_forward_and_its_exact_adjoint_backward():
    import keras

    from cnnviz import backend
    from cnnviz.explain.transforms import _affine

    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (2, 7, 6, 3)).astype(np.float32)
    factor, angle = 1.07, 0.3
    cos, sin = np.cos(angle) / factor, np.sin(angle) / factor
    cy, cx = 3.0, 2.5
    matrix = np.array([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy,
                       0, 0], np.float32)
    expected = keras.ops.image.affine_transform(
        image, np.tile(matrix, (2, 1)), interpolation="bilinear", fill_mode="constant",
        fill_value=0.5)
    found = keras.ops.convert_to_numpy(_affine(keras.ops.convert_to_tensor(image), factor, angle))
    np.testing.assert_allclose(found, keras.ops.convert_to_numpy(expected), atol=1e-5)
    # Backward: the map is affine, x -> A x + b; d sum(w * f(x)) / dx must be A^T w exactly.
    single = image[:1]
    base = keras.ops.convert_to_numpy(_affine(np.zeros_like(single), factor, angle)).ravel()
    columns = [keras.ops.convert_to_numpy(_affine(unit.reshape(single.shape), factor, angle))
               .ravel() - base for unit in np.eye(single.size, dtype=np.float32)]
    weights = rng.standard_normal(single.size).astype(np.float32)
    gradient = backend.compile(lambda x, w: (backend.input_gradients(
        lambda v: (keras.ops.sum(keras.ops.reshape(_affine(v, factor, angle), (1, -1)) * w,
                                 axis=1), ()), x)[0],), [])(single, weights[None])[0]
    np.testing.assert_allclose(np.asarray(gradient).ravel(), np.stack(columns, 1).T @ weights,
                               atol=1e-5)


def test_the_fourier_images_are_numpys_inverse_rfft2():
    import keras

    from cnnviz.explain.parameterization import _inverse_rfft2

    rng = np.random.default_rng(3)
    for height, width in ((8, 8), (7, 10), (5, 5)):
        real, imaginary = rng.standard_normal((2, 2, 3, height, width // 2 + 1))
        found = keras.ops.convert_to_numpy(_inverse_rfft2(
            keras.ops.convert_to_tensor(real.astype(np.float32)),
            keras.ops.convert_to_tensor(imaginary.astype(np.float32)), height, width))
        expected = np.fft.irfft2(real + 1j * imaginary, s=(height, width))
        np.testing.assert_allclose(found, expected, atol=1e-5)


def test_an_unknown_parameterization_is_refused():
    from cnnviz.explain import activation_maximization_batch

    with pytest.raises(CnnvizError, match="param 'wavelet' is not a parameterization"):
        activation_maximization_batch(_rgb_net(), None, (0,), param="wavelet")


def test_activation_max_cli_takes_param_and_transforms(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from cnnviz.cli import app

    _rgb_net(32).save(tmp_path / "model.keras")
    common = ["activation-max", str(tmp_path / "model.keras"), "--classes", "0,1", "--steps",
              "2", "--preprocess", "scale", "--save-arrays"]
    runs = {}
    for param in ("pixel", "fft"):
        out = tmp_path / param
        result = CliRunner().invoke(app, [*common, "--param", param, "--transforms",
                                          "pad,jitter,scale,rotate", "--out", str(out)],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        with Image.open(out / "classes.png") as png:
            assert png.format == "PNG"
        runs[param] = np.load(out / "classes.npz")["images"]
    assert runs["fft"].shape == runs["pixel"].shape == (2, 32, 32, 3)
    assert not np.allclose(runs["fft"], runs["pixel"])
    result = CliRunner().invoke(app, [*common, "--transforms", "spin", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "transform 'spin' is unknown" in result.output
