"""keras:NAME: keras.applications models by name, with their family's own preprocess_input, the
ImageNet class names, local weights files, and one-line errors offline. No test downloads."""

import keras
import numpy as np
import pytest
from PIL import Image

from cnnviz.errors import CnnvizError
from cnnviz.model.inputs import prepare
from cnnviz.model.pretrained import application_names, imagenet_class_names, pretrained_model
from cnnviz.report.selection import class_names_of, select_images
from cnnviz.runs.load import load_run

PIXELS = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.float32)

# Each model function of keras.applications and the module whose preprocess_input goes with it.
FAMILY_MODULES = {
    "ConvNeXt": "convnext", "DenseNet": "densenet", "EfficientNetV2": "efficientnet_v2",
    "EfficientNetB": "efficientnet", "InceptionResNetV2": "inception_resnet_v2",
    "InceptionV3": "inception_v3", "MobileNetV3": "mobilenet_v3", "MobileNetV2": "mobilenet_v2",
    "MobileNet": "mobilenet", "NASNet": "nasnet", "VGG16": "vgg16", "VGG19": "vgg19",
    "Xception": "xception", "ResNet50V2": "resnet_v2", "ResNet101V2": "resnet_v2",
    "ResNet152V2": "resnet_v2", "ResNet50": "resnet50", "ResNet": "resnet",
}


def _module_of(name: str):
    family = next(family for family in FAMILY_MODULES if name.startswith(family))
    return getattr(keras.applications, FAMILY_MODULES[family])


@pytest.mark.parametrize("name", application_names(keras))
def test_each_models_mode_is_its_familys_own_preprocess_input(name):
    from cnnviz.model.pretrained import _preprocess_mode

    expected = _module_of(name).preprocess_input(PIXELS.copy())
    np.testing.assert_allclose(prepare(PIXELS, _preprocess_mode(name)), expected,
                               rtol=1e-6, atol=1e-5)


def test_caffe_is_resnet50s_and_torch_is_densenets_preprocess_input():
    from cnnviz.model.pretrained import _preprocess_mode

    assert _preprocess_mode("ResNet50") == "caffe" and _preprocess_mode("DenseNet121") == "torch"
    np.testing.assert_allclose(prepare(PIXELS, "caffe"),
                               keras.applications.resnet50.preprocess_input(PIXELS.copy()),
                               rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(prepare(PIXELS, "torch"),
                               keras.applications.densenet.preprocess_input(PIXELS.copy()),
                               rtol=1e-6, atol=1e-5)


def test_the_imagenet_class_names_are_kerass_in_output_order():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert (names[0], names[281], names[282], names[285], names[999]) == (
        "tench", "tabby", "tiger_cat", "Egyptian_cat", "toilet_tissue")
    # As in Keras's imagenet_class_index.json, two names stand for two classes each.
    repeated = {name: [index for index, other in enumerate(names) if other == name]
                for name in set(names) if names.count(name) > 1}
    assert repeated == {"crane": [134, 517], "maillot": [638, 639]}
    assert all(name and name == name.strip() and " " not in name for name in names)


def test_an_unknown_name_is_one_line_with_close_matches():
    with pytest.raises(CnnvizError, match=r"did you mean keras:MobileNetV2\b.*as in "
                                          r"keras\.applications") as caught:
        load_run("keras:mobilenetv2")
    assert "\n" not in str(caught.value)
    with pytest.raises(CnnvizError, match="keras:NoSuchNet is not a keras.applications model"):
        pretrained_model("keras:NoSuchNet")


def test_weights_are_refused_for_anything_but_keras_name(tmp_path):
    with pytest.raises(CnnvizError, match="--weights .* is for pretrained models .keras:NAME."):
        load_run(tmp_path / "model.keras", weights=tmp_path / "x.weights.h5")


def test_a_missing_weights_file_is_one_line(tmp_path):
    missing = tmp_path / "none.weights.h5"
    with pytest.raises(CnnvizError, match=f"--weights {missing} does not exist"):
        load_run("keras:MobileNetV2", weights=missing)


def test_imagenet_weights_neither_cached_nor_downloadable_name_the_cache_and_weights(
        tmp_path, monkeypatch):
    import keras.src.backend.config as keras_config
    from keras.src.utils import file_utils

    # An empty Keras home, and every download sent to a closed local port: Keras's own
    # get_file looks in the cache, misses, and fails as it does offline.
    (tmp_path / "home").mkdir()  # as Keras makes its home at import
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "home"))
    real_get_file = file_utils.get_file

    def offline_get_file(fname, origin, **kwargs):
        return real_get_file(fname, "http://127.0.0.1:9/" + fname, **kwargs)

    monkeypatch.setattr(file_utils, "get_file", offline_get_file)
    with pytest.raises(CnnvizError) as caught:
        load_run("keras:MobileNetV3Small")
    message = str(caught.value)
    assert "\n" not in message
    assert f"looks for them in {tmp_path / 'home' / 'models'} " in message
    assert "URL fetch failure" in message and "--weights FILE" in message
    assert "model.save_weights('x.weights.h5')" in message


def _scores(model, inputs) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(inputs, training=False))


@pytest.mark.slow  # builds MobileNetV3Small twice and MobileNetV2
def test_a_legacy_h5_weights_file_loads_and_one_that_does_not_fit_is_one_line(tmp_path):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    # The format of Keras's own ImageNet weights files (layer_names at the root).
    keras.utils.set_random_seed(2)
    reference = keras.applications.MobileNetV3Small(weights=None)
    legacy = tmp_path / "mobilenet_v3_small.h5"
    with h5py.File(legacy, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, reference)
    run = load_run("keras:MobileNetV3Small", weights=legacy)
    assert run.preprocess == "none"
    pixels = np.random.default_rng(3).uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(_scores(run.model, pixels), _scores(reference, pixels),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(CnnvizError, match=f"cannot load --weights {legacy} into "
                                          "keras:MobileNetV2: Layer count mismatch"):
        load_run("keras:MobileNetV2", weights=legacy)


@pytest.mark.slow  # builds MobileNetV2 (224x224, 3.5M parameters) twice
def test_files_through_keras_name_equal_the_model_fed_its_own_preprocess_input(tmp_path):
    keras.utils.set_random_seed(0)
    reference = keras.applications.MobileNetV2(weights=None)
    weights = tmp_path / "mobilenet_v2.weights.h5"
    reference.save_weights(weights)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    files = [tmp_path / f"image_{index}.png" for index in range(2)]
    for image, path in zip(pixels, files, strict=True):
        Image.fromarray(image).save(path)

    run = load_run("keras:MobileNetV2", weights=weights)
    assert run.preprocess == "unit" and run.config is None and run.directory is None
    selection = select_images(run, ",".join(str(path) for path in files))
    read_back = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in files])
    expected_inputs = keras.applications.mobilenet_v2.preprocess_input(
        read_back.astype(np.float32))
    inputs = np.asarray(selection.images)
    np.testing.assert_allclose(inputs, expected_inputs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_scores(run.model, inputs), _scores(reference, expected_inputs),
                               rtol=1e-5, atol=1e-6)
    assert selection.class_names == class_names_of(run, 1000) == imagenet_class_names()
    assert selection.class_names[285] == "Egyptian_cat"

    # The command line: predict's CSV names the ImageNet class the bare model predicts.
    import csv
    import io

    from typer.testing import CliRunner

    from cnnviz.cli import app

    result = CliRunner().invoke(app, ["predict", "keras:MobileNetV2", "--weights", str(weights),
                                      "--images", ",".join(str(path) for path in files),
                                      "--top-k", "1"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected = reference.predict(expected_inputs, verbose=0)
    assert [row["predicted"] for row in rows] == [
        imagenet_class_names()[index] for index in expected.argmax(axis=1)]
    np.testing.assert_allclose([float(row["probability"]) for row in rows],
                               expected.max(axis=1), atol=1e-5)
