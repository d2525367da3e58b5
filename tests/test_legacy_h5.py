"""Legacy Keras `.h5` model files load wherever a `.keras` file does, as safely (`load_run`).

The model is shaped like the published Keras 2 emotion classifiers (mini-Xception, 48x48 grey faces
there, 32x32 here): conv + BN + ReLU, a separable block with a residual `Add`, a last conv with one
channel per class, global average pooling and a standalone softmax layer.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

from cnnviz.errors import CnnvizError
from cnnviz.explain import gradcam, saliency
from cnnviz.runs.load import load_keras_model, load_run

CLASSES = 4


def _emotion_model(seed: int = 0):
    """A mini-Xception on (32, 32, 1), every weight (BN moving statistics too) seeded and away
    from identity: BN's variance in [0.5, 2], its mean, scale and shift random."""
    inputs = keras.Input((32, 32, 1))
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    residual = L.Conv2D(16, 1, strides=2, padding="same", use_bias=False)(x)
    residual = L.BatchNormalization()(residual)
    x = L.SeparableConv2D(16, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.Activation("relu")(x)
    x = L.SeparableConv2D(16, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.MaxPooling2D(3, strides=2, padding="same")(x)
    x = L.Add()([x, residual])
    x = L.Conv2D(CLASSES, 3, padding="same", name="class_maps")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Activation("softmax", name="predictions")(x), name="emotion")

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, L.BatchNormalization):  # gamma, beta, moving mean, moving variance
            gamma, beta, mean, variance = (w.shape for w in weights)
            weights = [rng.uniform(0.5, 1.5, gamma), 0.3 * rng.standard_normal(beta),
                       0.3 * rng.standard_normal(mean), rng.uniform(0.5, 2.0, variance)]
        else:
            weights = [0.5 * rng.standard_normal(w.shape) for w in weights]
        layer.set_weights(weights)
    return model


def _lambda_model():
    inputs = keras.Input((4,))
    doubled = L.Lambda(lambda t: t * 2.0, name="double")(L.Dense(3, name="dense")(inputs))
    return keras.Model(inputs, doubled)


def _save(model, path):
    with warnings.catch_warnings():  # Keras warns that .h5 is legacy and that lambdas are unsafe
        warnings.simplefilter("ignore")
        model.save(path)
    return path


@pytest.fixture(scope="module")
def emotion(tmp_path_factory):
    """(the model, its .h5 file, its .keras file, 6 seeded images in [0, 1])."""
    folder = tmp_path_factory.mktemp("emotion")
    model = _emotion_model()
    images = np.random.default_rng(1).uniform(0, 1, (6, 32, 32, 1)).astype("float32")
    return (model, _save(model, folder / "emotion.h5"), _save(model, folder / "emotion.keras"),
            images)


def test_an_h5_model_predicts_as_its_keras_file_and_the_model_it_was_saved_from(emotion):
    model, h5_file, keras_file, images = emotion

    from_h5 = load_run(h5_file)
    from_keras = load_run(keras_file)

    assert from_h5.config is None and from_h5.directory is None
    # Every weight came back, the BN moving statistics among them (those are not identity).
    saved = {layer.name: layer.get_weights() for layer in model.layers}
    for layer in from_h5.model.layers:
        for got, expected in zip(layer.get_weights(), saved[layer.name], strict=True):
            np.testing.assert_array_equal(got, expected)
    expected = model.predict(images, verbose=0)
    assert not np.allclose(expected, 1 / CLASSES, atol=1e-3)  # a real decision, not a flat one
    np.testing.assert_allclose(from_h5.model.predict(images, verbose=0),
                               from_keras.model.predict(images, verbose=0), atol=1e-6)
    np.testing.assert_allclose(from_h5.model.predict(images, verbose=0), expected, atol=1e-6)


def test_an_h5_model_is_explained_as_its_keras_file(emotion):
    _, h5_file, keras_file, images = emotion
    from_h5, from_keras = load_run(h5_file).model, load_run(keras_file).model

    cams = gradcam(from_h5, images, layer="class_maps")
    np.testing.assert_allclose(cams, gradcam(from_keras, images, layer="class_maps"), atol=1e-5)
    assert cams.shape == (6, 32, 32) and cams.max() > 0
    maps = saliency(from_h5, images, targets=2)
    np.testing.assert_allclose(maps, saliency(from_keras, images, targets=2), atol=1e-6)
    assert maps.shape == (6, 32, 32) and maps.max() > 0


def test_hdf5_suffix_loads_too(emotion, tmp_path):
    model, h5_file, _, images = emotion
    hdf5_file = tmp_path / "emotion.hdf5"
    hdf5_file.write_bytes(h5_file.read_bytes())

    np.testing.assert_allclose(load_keras_model(hdf5_file).predict(images, verbose=0),
                               model.predict(images, verbose=0), atol=1e-6)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_a_lambda_layer_is_refused_unless_unsafe(tmp_path, suffix):
    model = _lambda_model()
    path = _save(model, tmp_path / f"lambda{suffix}")

    with pytest.raises(CnnvizError) as refused:
        load_run(path)
    message = str(refused.value)
    assert str(path) in message and "--unsafe" in message and "arbitrary code" in message
    assert "Lambda" in message and "\n" not in message

    loaded = load_run(path, unsafe=True).model
    inputs = np.random.default_rng(2).standard_normal((3, 4)).astype("float32")
    dense = model.get_layer("dense")
    kernel, bias = dense.get_weights()
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0), 2.0 * (inputs @ kernel + bias),
                               rtol=1e-5, atol=1e-6)


def _as_keras_2_lambdas(config):
    """Rewrite every Lambda's function in a model config as Keras 2 wrote it: [code, None, None]."""
    if isinstance(config, dict):
        if config.get("class_name") == "Lambda":
            function = config["config"]["function"]["config"]
            config["config"]["function"] = [function["code"], None, None]
            config["config"]["function_type"] = "lambda"
        for value in config.values():
            _as_keras_2_lambdas(value)
    elif isinstance(config, list):
        for value in config:
            _as_keras_2_lambdas(value)


@pytest.mark.parametrize("written_by", ["keras 3", "keras 2"])
def test_a_lambda_layer_in_a_nested_h5_model_is_refused(tmp_path, written_by):
    import json

    import h5py

    inputs = keras.Input((4,))
    model = keras.Model(inputs, _lambda_model()(inputs))
    path = _save(model, tmp_path / "nested.h5")
    if written_by == "keras 2":
        with h5py.File(path, "r+") as file:
            config = json.loads(file.attrs["model_config"])
            _as_keras_2_lambdas(config)
            file.attrs["model_config"] = json.dumps(config)

    with pytest.raises(CnnvizError, match="--unsafe") as refused:
        load_keras_model(path)
    assert str(path) in str(refused.value)
    inputs = np.ones((2, 4), "float32")
    np.testing.assert_allclose(load_keras_model(path, unsafe=True).predict(inputs, verbose=0),
                               model.predict(inputs, verbose=0), atol=1e-6)


def test_a_truncated_h5_file_is_one_line_naming_it(emotion, tmp_path):
    _, h5_file, _, _ = emotion
    data = h5_file.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(CnnvizError) as damaged:
        load_run(truncated)
    message = str(damaged.value)
    assert str(truncated) in message and "truncated or damaged" in message and "\n" not in message


def test_other_files_are_refused_naming_what_is_accepted(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")

    with pytest.raises(CnnvizError, match=r"\.keras, \.h5 or \.hdf5") as refused:
        load_run(notes)
    assert str(notes) in str(refused.value)
    with pytest.raises(CnnvizError, match=r"does not exist; give a run directory, a \.keras, \.h5"):
        load_run(tmp_path / "missing.h5")


def test_the_command_line_explains_an_h5_file_with_its_preprocessing_and_class_names(
        emotion, tmp_path):
    """gradcam on the .h5 with --preprocess unit equals Grad-CAM of pixels / 127.5 - 1."""
    from PIL import Image
    from typer.testing import CliRunner

    from cnnviz.cli import app

    model, h5_file, _, _ = emotion
    pixels = np.random.default_rng(4).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"face{index}.png")
    out = tmp_path / "cams"
    result = CliRunner().invoke(app, [
        "gradcam", str(h5_file), "--images", f"{tmp_path}/face*.png", "--preprocess", "unit",
        "--layer", "class_maps", "--class-names", "angry,happy,sad,neutral", "--save-arrays",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    inputs = pixels[..., None].astype(np.float32) / 127.5 - 1.0
    expected = gradcam(model, inputs, layer="class_maps")
    for index in range(2):
        np.testing.assert_allclose(np.load(out / f"face{index}.npz")["gradcam"],
                                   expected[index], atol=1e-5)


def test_the_command_line_refuses_lambda_code_unless_unsafe(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from cnnviz.cli import app

    inputs = keras.Input((8, 8, 1))
    halved = L.Lambda(lambda t: t * 0.5, name="half")(inputs)
    outputs = L.Dense(2, activation="softmax")(L.Flatten()(halved))
    path = _save(keras.Model(inputs, outputs), tmp_path / "lambda.h5")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "zero.png")
    command = ["predict", str(path), "--images", str(tmp_path / "zero.png")]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code == 2
    assert len(refused.output.strip().splitlines()) == 1 and "--unsafe" in refused.output
    assert CliRunner().invoke(app, [*command, "--unsafe"]).exit_code == 0
