"""Exported models (.tflite float and int8, .onnx, SavedModel folders) read by their own runtimes:
predict, evaluate, occlusion and RISE on them give what the .keras model gives, within the
export's own round-trip error (float) or a rank correlation of at least 0.95 (int8)."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnviz.cli import app
from cnnviz.errors import CnnvizError

runner = CliRunner()
FLOAT = ("tflite", "onnx", "savedmodel")
FILES = {"tflite": "model.tflite", "onnx": "model.onnx", "savedmodel": "savedmodel",
         "tflite-int8": "model.int8.tflite"}
ROUND_TRIP = 1e-5  # float exports reproduce the .keras outputs to ~1e-7; the bar


def blob_images(seed: int, count: int) -> np.ndarray:
    """(count, 16, 16, 3) float32 8-bit pixels: a dark noisy ground and one bright 6x6 square of
    a random colour at a random place (integers, so PNG files hold them exactly)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (count, 16, 16, 3))
    for image in images:
        top, left = rng.integers(0, 11, 2)
        image[top:top + 6, left:left + 6] = rng.integers(120, 256, 3)
    return images.astype(np.float32)


def small_cnn(seed: int = 1):
    """16x16x3 -> Rescaling(1/255) -> Conv2D(8, relu) -> MaxPool -> Conv2D(16, relu) -> GAP ->
    Dense(4, softmax), as cnnviz models begin (raw pixels in). Keras's seeded initializers; the
    head is set so its logits spread by about one unit over blob images (no saturated softmax,
    so occlusion maps move by far more than an int8 model's output step of 1/256)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", padding="same")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", padding="same")(x)
    features = keras.layers.GlobalAveragePooling2D()(x)
    head = keras.layers.Dense(4, activation="softmax")
    model = keras.Model(inputs, head(features))
    seen = keras.Model(inputs, features).predict(blob_images(seed + 100, 256), verbose=0)
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((16, 4)) / seen.std(axis=0).mean() / 4
    head.set_weights([kernel.astype(np.float32), (-seen.mean(axis=0) @ kernel).astype(np.float32)])
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The small CNN as model.keras and exported by `cnnviz export` (savedmodel, tflite, onnx,
    with export.json), plus a full-integer int8 .tflite calibrated on blob images, which
    export.json does not list (so it is read without a record)."""
    from cnnviz.deploy.export import export_model

    folder = tmp_path_factory.mktemp("exported")
    model = small_cnn()
    model.save(folder / "model.keras")
    result = runner.invoke(app, ["export", str(folder / "model.keras"), "--format", "savedmodel",
                                 "--format", "tflite", "--format", "onnx", "--out",
                                 str(folder), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    export_model(model, folder / FILES["tflite-int8"], "tflite-int8",
                 representative=blob_images(2, 200))
    images = blob_images(3, 16)
    pictures = folder / "images"
    pictures.mkdir()
    from PIL import Image

    for index, image in enumerate(images):
        Image.fromarray(image.astype(np.uint8)).save(pictures / f"blob_{index:02d}.png")
    return {"model": model, "folder": folder, "images": images, "pictures": pictures,
            "payload": json.loads(result.stdout),
            **{name: folder / file for name, file in FILES.items()}}


def _run(path):
    from cnnviz.runs.load import load_run

    return load_run(path)


@pytest.mark.slow
@pytest.mark.parametrize("format_name", FLOAT)
def test_a_float_export_predicts_what_the_keras_model_does(exported, format_name):
    from cnnviz.model.compiled import predict_probabilities

    run = _run(exported[format_name])
    assert (run.config, run.directory, run.preprocess, run.preprocess_note) == (
        None, None, "none", None), "export.json records raw 0..255 pixels in"
    assert run.model.inputs[0].shape == (None, 16, 16, 3) and run.model.outputs[0].shape[-1] == 4
    received = predict_probabilities(run.model, exported["images"])
    expected = exported["model"].predict(exported["images"], verbose=0)
    assert np.max(np.abs(received - expected)) <= ROUND_TRIP
    assert exported["payload"]["formats"][format_name]["max_abs_difference"] <= ROUND_TRIP


@pytest.mark.slow
def test_an_int8_export_is_read_in_float_and_predicts_the_same_classes(exported):
    from cnnviz.model.compiled import predict_probabilities

    run = _run(exported["tflite-int8"])
    assert run.model.quantized and run.model.inputs[0].dtype == "int8"
    assert run.model.output_activation(0) == "softmax", "read from its dequantized values"
    assert run.preprocess == "none" and "no export.json" in run.preprocess_note
    received = predict_probabilities(run.model, exported["images"])
    expected = exported["model"].predict(exported["images"], verbose=0)
    assert np.mean(received.argmax(axis=1) == expected.argmax(axis=1)) >= 0.9
    assert np.max(np.abs(received - expected)) <= 0.1


@pytest.mark.slow
@pytest.mark.parametrize("format_name", FLOAT)
def test_float_occlusion_equals_the_keras_one_within_the_round_trip(exported, format_name):
    from cnnviz.explain import occlusion

    expected = occlusion(exported["model"], exported["images"])
    received = occlusion(_run(exported[format_name]).model, exported["images"])
    np.testing.assert_array_equal(received.targets, expected.targets)
    assert np.max(np.abs(received.probability - expected.probability)) <= ROUND_TRIP
    np.testing.assert_array_equal(received.predicted_class, expected.predicted_class)


@pytest.mark.slow
def test_int8_occlusion_ranks_pixels_as_the_keras_one_does(exported):
    from cnnviz.explain import occlusion
    from cnnviz.trust.sanity import rank_correlation

    expected = occlusion(exported["model"], exported["images"])
    received = occlusion(_run(exported["tflite-int8"]).model, exported["images"],
                         expected.targets)
    assert np.mean(rank_correlation(expected.probability, received.probability)) >= 0.95


@pytest.mark.slow
def test_rise_on_a_tflite_with_the_same_seed_gives_the_keras_map(exported):
    from cnnviz.explain import rise

    images = exported["images"][:4]
    expected = rise(exported["model"], images, masks=300, seed=7)
    received = rise(_run(exported["tflite"]).model, images, masks=300, seed=7)
    assert np.max(np.abs(received - expected)) <= ROUND_TRIP
    quantized = rise(_run(exported["tflite-int8"]).model, images, masks=300, seed=7)
    assert np.max(np.abs(quantized - expected)) <= 0.02


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    found = {}
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as arrays:
            found[path.stem] = arrays["probability"]
    return found


@pytest.mark.slow
def test_the_occlusion_command_on_exported_files_saves_the_keras_maps(exported, tmp_path):
    from cnnviz.trust.sanity import rank_correlation

    maps = {}
    for name in ("keras", "tflite", "tflite-int8"):
        source = exported["folder"] / "model.keras" if name == "keras" else exported[name]
        result = runner.invoke(app, ["occlusion", str(source), "--images",
                                     str(exported["pictures"] / "blob_0[0-7].png"),
                                     "--save-arrays", "--out", str(tmp_path / name)],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert ("no export.json" in result.output) == (name == "tflite-int8"), result.output
        maps[name] = _arrays(tmp_path / name)
    keys = sorted(maps["keras"])
    assert len(keys) == 8 and sorted(maps["tflite"]) == keys
    assert max(np.max(np.abs(maps["tflite"][key] - maps["keras"][key])) for key in keys) \
        <= ROUND_TRIP
    correlation = rank_correlation(np.stack([maps["keras"][key] for key in keys]),
                                   np.stack([maps["tflite-int8"][key] for key in keys]))
    assert np.mean(correlation) >= 0.95


def _predicted(output: str) -> list[tuple[str, str, float]]:
    rows = [line.split(",") for line in output.strip().splitlines()
            if line.startswith(("file,", "/"))]
    assert rows[0][:3] == ["file", "predicted", "probability"]
    return [(Path(row[0]).name, row[1], float(row[2])) for row in rows[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("format_name", FLOAT)
def test_predict_on_an_exported_file_writes_the_keras_classes(exported, format_name):
    rows = {}
    for source in (exported["folder"] / "model.keras", exported[format_name]):
        result = runner.invoke(app, ["predict", str(source), "--images",
                                     str(exported["pictures"])], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        rows[source] = _predicted(result.stdout)
    expected, received = rows.values()
    assert len(expected) == 16
    assert [row[:2] for row in received] == [row[:2] for row in expected]
    assert max(abs(a[2] - b[2]) for a, b in zip(received, expected)) <= 2e-6  # 6 decimals


@pytest.mark.slow
def test_evaluate_on_an_exported_file_counts_what_the_keras_model_does(exported, tmp_path):
    import shutil

    labelled = tmp_path / "data"
    for index, path in enumerate(sorted(exported["pictures"].glob("*.png"))):
        (labelled / str(index % 4)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, labelled / str(index % 4) / path.name)
    confusion = {}
    for name, source in (("keras", exported["folder"] / "model.keras"),
                         ("onnx", exported["onnx"])):
        result = runner.invoke(app, ["evaluate", str(source), "--data", str(labelled), "--out",
                                     str(tmp_path / name), "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        confusion[name] = json.loads(result.stdout)["evaluation"]["confusion_matrix"]
    assert confusion["onnx"] == confusion["keras"]


@pytest.mark.slow
@pytest.mark.parametrize("command, extra", [
    ("gradcam", ["--images", "PICTURES"]), ("saliency", ["--images", "PICTURES"]),
    ("sanity", ["--images", "PICTURES"]), ("filters", []), ("layers", []), ("summary", []),
    ("export", ["--format", "onnx"]),
])
def test_a_command_that_needs_gradients_or_layers_refuses_an_exported_file(exported, command,
                                                                           extra):
    path = exported["tflite"]
    arguments = [str(exported["pictures"]) if value == "PICTURES" else value for value in extra]
    result = runner.invoke(app, [command, str(path), *arguments])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [(f"error: {path} is an exported model (tflite): only predict, evaluate, "
                      "occlusion and rise run on it (they need forward passes only); give the "
                      f".keras file for {command}")]


@pytest.mark.slow
def test_export_json_records_how_far_each_files_occlusion_maps_move(exported):
    for name in FLOAT:
        entry = exported["payload"]["formats"][name]
        assert entry["occlusion_images"] == 16
        assert entry["occlusion_rank_correlation"] >= 0.9999
        assert entry["occlusion_max_abs_difference"] <= ROUND_TRIP
    (output,) = exported["payload"]["outputs"]
    assert (output["units"], output["activation"]) == (4, "softmax")


@pytest.mark.slow
def test_export_of_a_run_records_occlusion_agreement_and_quantizes_to_int8(digits_run, tmp_path):
    from cnnviz.model.compiled import predict_probabilities

    for extra in ([], ["--quantize", "int8"]):
        result = runner.invoke(app, ["export", str(digits_run), "--format", "tflite", "--format",
                                     "onnx", "--out", str(tmp_path), *extra],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "export.json").read_text())
    assert set(record["formats"]) == {"tflite", "onnx", "tflite-int8"}
    for name in ("tflite", "onnx"):
        assert record["formats"][name]["occlusion_rank_correlation"] >= 0.9999
        assert record["formats"][name]["occlusion_images"] == 16
    quantized = record["formats"]["tflite-int8"]
    assert quantized["quantized"] == "int8" and "matches" not in quantized
    assert quantized["same_class"] >= 0.9 and quantized["occlusion_rank_correlation"] >= 0.8
    run = _run(tmp_path / "model.int8.tflite")
    assert run.model.quantized and run.model.output_activation() == "softmax"
    assert run.preprocess == "none" and run.preprocess_note is None
    keras_run = _run(digits_run)
    images = keras_run.dataset().test.images(np.arange(64))
    agreeing = (predict_probabilities(run.model, images).argmax(axis=1)
                == predict_probabilities(keras_run.model, images).argmax(axis=1))
    assert agreeing.mean() >= 0.9


# ---------------------------------------------------------------- small pieces, no export
def test_quantization_uses_the_tensors_scale_and_zero_point():
    from cnnviz.model.exported import _dequantized, _quantized

    detail = {"dtype": np.int8, "quantization": (0.5, -128)}
    quantized = _quantized(np.array([0.0, 1.2, 300.0], np.float32), detail)
    np.testing.assert_array_equal(quantized, np.array([-128, -126, 127], np.int8))
    np.testing.assert_array_equal(_dequantized(quantized, detail), [0.0, 1.0, 127.5])
    float_detail = {"dtype": np.float32, "quantization": (0.0, 0)}
    assert _quantized(np.array([1.5]), float_detail).dtype == np.float32


@pytest.fixture(scope="module")
def logits_onnx(tmp_path_factory):
    """A tiny model whose output is linear (logits), exported to ONNX with no export.json."""
    import keras
    from _models import randomize

    from cnnviz.deploy.export import export_model

    model = randomize(keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                                        keras.layers.Dense(3)]), seed=4, scale=0.1)
    return model, export_model(model, tmp_path_factory.mktemp("onnx") / "logits.onnx", "onnx")


def test_a_logits_output_is_read_through_a_softmax(logits_onnx):
    from cnnviz.model.compiled import predict_probabilities
    from cnnviz.model.exported import ExportedModel

    model, path = logits_onnx
    exported = ExportedModel(path)
    assert exported.output_activation(0) == "linear"
    images = np.random.default_rng(0).uniform(0, 255, (5, 6, 6, 1)).astype(np.float32)
    np.testing.assert_allclose(predict_probabilities(exported, images),
                               predict_probabilities(model, images), atol=1e-6)


def test_methods_that_need_gradients_refuse_an_exported_model(logits_onnx):
    from cnnviz.explain import saliency
    from cnnviz.model.exported import ExportedModel

    with pytest.raises(CnnvizError, match=r"logits\.onnx is an exported model \(onnx\): only "
                                          "predict, evaluate, occlusion and rise"):
        saliency(ExportedModel(logits_onnx[1]), np.zeros((1, 6, 6, 1), np.float32))


def test_a_damaged_export_json_is_named_in_one_line(logits_onnx, tmp_path):
    import shutil

    from cnnviz.model.exported import ExportedModel

    shutil.copy(logits_onnx[1], tmp_path / "logits.onnx")
    (tmp_path / "export.json").write_text("{not json")
    with pytest.raises(CnnvizError, match=r"export\.json is damaged .*delete it to read "
                                          r"logits\.onnx without it"):
        ExportedModel(tmp_path / "logits.onnx")


def test_a_file_that_is_no_model_is_named(tmp_path):
    from cnnviz.runs.load import load_run

    (tmp_path / "broken.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(CnnvizError, match=r"cannot load exported model .*broken\.tflite "):
        load_run(tmp_path / "broken.tflite")


def test_quantize_applies_to_the_tflite_format_only():
    from cnnviz.deploy.export import export_formats

    assert export_formats(["onnx", "tflite", "onnx"], "int8") == ["onnx", "tflite-int8"]
    with pytest.raises(CnnvizError, match="--quantize int8 is for --format tflite"):
        export_formats(["onnx"], "int8")
