"""Input ranges follow the preprocessing: for each --preprocess mode, what occlusion's patch,
RISE's and Score-CAM's masked pixels and the integrated-gradients baseline feed the model equal
the documented values, computed here from keras.applications' constants (black is -1 for
`unit`, the negated BGR channel means for `caffe`)."""

import importlib

import keras
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnviz.cli import app

runner = CliRunner()
# The modules (cnnviz.explain re-exports functions of the same names as its submodules).
OCCLUSION, RISE, CAM, INTEGRATED_GRADIENTS = (
    importlib.import_module(f"cnnviz.explain.{name}")
    for name in ("occlusion", "rise", "cam", "integrated_gradients"))

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])
TORCH_MEAN, TORCH_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
# (black, white) per channel of the model's input, as keras.applications documents the modes.
DOCUMENTED = {
    "scale": (np.zeros(3), np.ones(3)),
    "unit": (-np.ones(3), np.ones(3)),
    "caffe": (-CAFFE_MEAN_BGR, 255.0 - CAFFE_MEAN_BGR),
    "torch": (-TORCH_MEAN / TORCH_STD, (1.0 - TORCH_MEAN) / TORCH_STD),
    "none": (np.zeros(3), np.full(3, 255.0)),
}


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """A .keras file with no preprocessing layer, and one white 8x8 PNG."""
    folder = tmp_path_factory.mktemp("modes")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)),
                              keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    model.save(folder / "bare.keras")
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(folder / "white.png")
    return folder


def _invoke(folder, *arguments):
    result = runner.invoke(app, [arguments[0], str(folder / "bare.keras"), "--images",
                                 str(folder / "white.png"), "--out", str(folder / "out"),
                                 *arguments[1:]])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("mode", list(DOCUMENTED))
def test_occlusion_fills_the_patch_with_the_modes_grey_and_black(bare_model, mode, monkeypatch):
    black, white = DOCUMENTED[mode]
    fed = []
    original = OCCLUSION.probabilities_of

    def recording(model, count, fetch, **options):
        fed.append(fetch(0, count))
        return original(model, count, fetch, **options)

    monkeypatch.setattr(OCCLUSION, "probabilities_of", recording)
    for fill, expected in ((0.5, (black + white) / 2), (0.0, black)):
        fed.clear()
        _invoke(bare_model, "occlusion", "--preprocess", mode, "--patch", "4", "--fill", str(fill))
        copies = fed[0]  # copy 0 is the intact (white) image, copy 1 hides the top-left window
        np.testing.assert_allclose(copies[0, 0, 0], white, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(copies[1, :4, :4], np.broadcast_to(expected, (4, 4, 3)),
                                   rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(copies[1, 4:, 4:], np.broadcast_to(white, (4, 4, 3)),
                                   rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", ["unit", "caffe", "torch"])
def test_rise_masks_to_the_modes_black(bare_model, mode, monkeypatch):
    black, white = DOCUMENTED[mode]
    fed = []
    original = RISE.probabilities_of

    def recording(model, count, fetch, **options):
        if options.get("consume") is not None:  # the masked copies, not the intact pass
            fed.append(np.concatenate([fetch(start, min(start + 256, count))
                                       for start in range(0, count, 256)]))
        return original(model, count, fetch, **options)

    monkeypatch.setattr(RISE, "probabilities_of", recording)
    _invoke(bare_model, "rise", "--preprocess", mode, "--masks", "64", "--cell", "2")
    masked = fed[0].reshape(-1, 3)
    # A white image seen through masks in [0, 1]: black where a mask is 0, never beyond.
    np.testing.assert_allclose(masked.min(axis=0), black, rtol=1e-6, atol=1e-4)
    assert (masked <= white + 1e-4).all() and (masked.max(axis=0) > (black + white) / 2).all()


@pytest.mark.parametrize("mode", ["unit", "caffe"])
def test_score_cam_masks_to_the_modes_black(bare_model, mode, monkeypatch):
    fills = []
    original = CAM._masked_scores_body
    monkeypatch.setattr(CAM, "_masked_scores_body",
                        lambda fill: fills.append(np.asarray(fill)) or original(fill))
    _invoke(bare_model, "cam", "--method", "scorecam", "--preprocess", mode)
    np.testing.assert_allclose(fills[0], DOCUMENTED[mode][0], rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("mode", ["unit", "caffe", "torch"])
def test_the_integrated_gradients_baseline_is_a_pixel_value(bare_model, mode, monkeypatch):
    black, white = DOCUMENTED[mode]
    starts = []
    original = INTEGRATED_GRADIENTS.baseline_batch

    def recording(images, baseline):
        starts.append(original(images, baseline))
        return starts[-1]

    monkeypatch.setattr(INTEGRATED_GRADIENTS, "baseline_batch", recording)
    for pixel, expected in (("0", black), ("255", white), ("51", black + 0.2 * (white - black))):
        starts.clear()
        _invoke(bare_model, "integrated-gradients", "--preprocess", mode, "--steps", "4",
                "--baseline", pixel)
        np.testing.assert_allclose(starts[0][0], np.broadcast_to(expected, (8, 8, 3)),
                                   rtol=1e-5, atol=1e-4)


def test_an_augmentation_block_before_rescaling_is_looked_through():
    """The transfer-learning guide's `data_augmentation -> Rescaling -> base` takes 0..255."""
    from cnnviz.model.inputs import channel_range, first_layer, resolve_mode

    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"),
                                     keras.layers.RandomRotation(0.1)], name="augmentation")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(augmentation(inputs))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(x))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    assert type(first_layer(model)).__name__ == "Rescaling"
    assert resolve_mode(model, "auto") == ("none", None)
    lows, highs = channel_range(model)
    assert lows.tolist() == [0.0] * 3 and highs.tolist() == [255.0] * 3


@pytest.mark.slow  # trains three small runs
@pytest.mark.parametrize("preprocessing", ["scale", "standardize", "none"])
def test_explain_and_predict_feed_the_same_tensor_for_the_same_file_and_run(
        preprocessing, tmp_path, monkeypatch):
    """A test image as a PNG file: predict feeds the model what explaining test index 0 does."""
    import csv
    import io

    import cnnviz.model.compiled
    from cnnviz.config.loading import load_config
    from cnnviz.report.selection import select_images
    from cnnviz.runs.load import load_run
    from cnnviz.train.fit import train

    config = load_config("configs/digits.yaml", [
        "data.image_size=null", "train.epochs=1", "train.verbose=0",
        f"data.preprocessing={preprocessing}"])
    run_dir = train(config, tmp_path / "runs", log=lambda line: None).run_dir
    run = load_run(run_dir)
    pixels = run.dataset().test.images([0])[0]  # 8-bit units (digits' 0..16 times 255/16)
    Image.fromarray(np.round(pixels[..., 0]).astype(np.uint8)).save(tmp_path / "test_0.png")

    by_index = np.asarray(select_images(run, "0").images)
    by_file = np.asarray(select_images(run, str(tmp_path / "test_0.png")).images)
    np.testing.assert_allclose(by_file, by_index, atol=0.5 + 1e-5)  # the PNG's rounding only

    fed = []
    original = cnnviz.model.compiled.predict_probabilities
    monkeypatch.setattr(cnnviz.model.compiled, "predict_probabilities",
                        lambda model, images, **kw: fed.append(np.asarray(images))
                        or original(model, images, **kw))
    result = runner.invoke(app, ["predict", str(run_dir), "--images",
                                 str(tmp_path / "test_0.png")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(fed[0], by_file, atol=1e-5)
    row = next(csv.DictReader(io.StringIO(result.stdout)))
    probabilities = original(run.model, by_file)[0]
    assert row["predicted"] == run.dataset().class_names[int(probabilities.argmax())]


def test_augmentation_under_preprocessing_none_keeps_the_8_bit_range():
    """RandomBrightness/RandomContrast get the data's value range (`Dataset.value_range`):
    0..255 under `none` too, so they do not clip raw pixels to [0, 1]."""
    from cnnviz.config.loading import load_config
    from cnnviz.data import load_dataset

    for preprocessing in ("none", "scale"):
        config = load_config("configs/digits.yaml", [f"data.preprocessing={preprocessing}"])
        dataset = load_dataset(config)
        assert dataset.value_range == (0.0, 255.0), preprocessing
        assert float(dataset.x_test.max()) == 255.0
    assert dataset.preprocessing.layers(1)  # scale has its Rescaling layer; none has none
    assert load_dataset(load_config("configs/digits.yaml", ["data.preprocessing=none"])
                        ).preprocessing.layers(1) == []
