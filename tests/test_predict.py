"""cnnviz predict and evaluate --data DIR on real image files, against the model run by hand."""

import csv
import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnviz.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image_folder(digits_run, tmp_path_factory):
    """The run's first 40 test images as 8x8 PNGs in class folders (0/, 1/, ...)."""
    from cnnviz.runs.load import load_run

    run = load_run(digits_run)
    test = run.dataset().test
    root = tmp_path_factory.mktemp("digits_png")
    for index in range(40):
        pixels = np.clip(np.round(test.images([index])[0, ..., 0]), 0, 255).astype(np.uint8)
        folder = root / run.dataset().class_names[test.labels[index]]
        folder.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def _by_hand(model, paths):
    from cnnviz.data.images import read_images

    images = read_images(paths, tuple(int(side) for side in model.inputs[0].shape[1:]))
    return model.predict(images, verbose=0)


def test_predict_csv_matches_the_model_on_the_same_files(digits_run, image_folder):
    from cnnviz.runs.load import load_run

    result = runner.invoke(app, ["predict", str(digits_run), "--images", str(image_folder),
                                 "--top-k", "3", "--batch-size", "16"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    paths = sorted(image_folder.rglob("*.png"))
    assert [Path(row["file"]) for row in rows] == paths
    assert list(rows[0]) == ["file", "predicted", "probability", "top2", "top2_probability",
                             "top3", "top3_probability"]
    expected = _by_hand(load_run(digits_run).model, paths)
    for row, probabilities in zip(rows, expected):
        order = np.argsort(-probabilities, kind="stable")
        assert [row["predicted"], row["top2"], row["top3"]] == [str(i) for i in order[:3]]
        assert float(row["probability"]) == pytest.approx(probabilities[order[0]], abs=2e-6)
        assert float(row["top3_probability"]) == pytest.approx(probabilities[order[2]], abs=2e-6)


def test_predict_to_a_csv_file_with_json_from_a_glob(digits_run, image_folder, tmp_path):
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(digits_run), "--images",
                                 str(image_folder / "3" / "*.png"), "--csv", str(out), "--json"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    rows = _rows(out.read_text())
    assert payload["images"] == len(rows) == len(list((image_folder / "3").glob("*.png"))) > 0
    assert payload["csv"] == str(out) and [p.name for p in tmp_path.iterdir()] == [out.name]
    with_rows = json.loads(runner.invoke(app, ["predict", str(digits_run), "--images",
                                               str(image_folder / "3"), "--json"]).stdout)
    assert [row["predicted"] for row in with_rows["predictions"]] == [r["predicted"] for r in rows]


def test_predict_names_a_bad_file_in_one_line(digits_run, image_folder, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    good = next(image_folder.rglob("*.png"))
    result = runner.invoke(app, ["predict", str(digits_run), "--images", f"{good},{bad}"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and lines[0].startswith("error:")


def test_predict_a_bare_keras_file_scales_unless_it_has_a_rescaling_layer(tmp_path, image_folder):
    inputs = keras.Input((8, 8, 1))
    plain = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(
        keras.layers.Flatten()(inputs)), name="plain")
    rescaled = keras.Model(inputs, plain(keras.layers.Rescaling(1 / 255)(inputs)))
    paths = sorted(image_folder.rglob("*.png"))[:5]
    for model, name in ((plain, "plain"), (rescaled, "rescaled")):
        model.save(tmp_path / f"{name}.keras")
        result = runner.invoke(app, ["predict", str(tmp_path / f"{name}.keras"), "--images",
                                     ",".join(map(str, paths))], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        first = _rows(result.stdout)[0]
        pixels = _by_hand(rescaled, paths[:1])  # both see x / 255 in the end
        assert float(first["probability"]) == pytest.approx(pixels[0].max(), abs=2e-6), name
        assert ("divided by 255" in result.stderr) is (name == "plain")


def test_evaluate_a_folder_streams_it_and_matches_by_hand(digits_run, image_folder):
    from cnnviz.runs.load import load_run

    result = runner.invoke(app, ["evaluate", str(digits_run), "--data", str(image_folder),
                                 "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)["evaluation"]
    paths = sorted(image_folder.rglob("*.png"))
    run = load_run(digits_run)
    names = run.dataset().class_names
    truth = np.array([names.index(path.parent.name) for path in paths])
    predicted = _by_hand(run.model, paths).argmax(axis=1)
    assert evaluation["images"] == len(paths)
    assert evaluation["accuracy"] == pytest.approx(np.mean(predicted == truth))
    assert (digits_run / "evaluation" / image_folder.name / "confusion_matrix.png").is_file()
    assert f"Evaluation on {image_folder}" in (digits_run / "index.html").read_text()


def test_evaluate_refuses_a_folder_with_a_class_the_model_lacks(digits_run, tmp_path):
    for name in ("3", "cat"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name / "a.png")
    result = runner.invoke(app, ["evaluate", str(digits_run), "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "classes 'cat' are not classes of the model" in result.output


def test_evaluate_a_bare_keras_file_on_a_folder_takes_its_classes_and_preprocess(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "pets"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for index in range(4):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{index}.png")
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Dense(2, kernel_initializer=keras.initializers.RandomNormal(seed=1))(
        keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Softmax()(hidden))  # expects x / 255
    model.save(tmp_path / "pets.keras")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "pets.keras"), "--data", str(folder),
                                 "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)["evaluation"]
    assert list(evaluation["per_class"]) == ["cat", "dog"]
    assert "divided by 255" in result.stderr
    paths = sorted(folder.rglob("*.png"))
    truth = np.array([["cat", "dog"].index(path.parent.name) for path in paths])
    pixels = _pixels(model, paths)

    def log_loss(inputs):
        probabilities = model.predict(inputs, verbose=0)
        return float(np.mean(-np.log(np.clip(probabilities[np.arange(len(truth)), truth],
                                             1e-7, 1.0))))

    assert evaluation["log_loss"] == pytest.approx(log_loss(pixels / 255.0), rel=1e-5)
    assert abs(log_loss(pixels) - log_loss(pixels / 255.0)) > 0.1, "raw pixels would differ"
    assert (tmp_path / "pets_evaluation" / "pets" / "confusion_matrix.png").is_file()


def _pixels(model, paths):
    from cnnviz.data.images import read_images

    return read_images(paths, tuple(int(side) for side in model.inputs[0].shape[1:]))
