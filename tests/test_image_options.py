"""The image options every command that reads a model and images shares (--preprocess, --resize,
--output, --class-names, --weights, --unsafe): one definition, and each option's effect on the
numbers written, checked against the model run by hand."""

import csv
import io
import json

import keras
import numpy as np
import pytest
import typer.main
from PIL import Image
from typer.testing import CliRunner

from cnnviz.cli import app

runner = CliRunner()

SHARED = ("output", "preprocess", "resize", "class_names", "weights", "unsafe")
READS_IMAGES = ("saliency", "gradcam", "cam", "integrated-gradients", "gradient-x-input", "rise",
                "occlusion", "feature-maps", "activation-max", "sanity", "faithfulness",
                "verify", "predict", "evaluate")


def _options(name: str) -> dict:
    command = typer.main.get_command(app).commands[name]
    return {param.name: param for param in command.params}


def test_every_command_that_reads_images_takes_the_same_options():
    first = _options(READS_IMAGES[0])
    for name in READS_IMAGES:
        options = _options(name)
        missing = [option for option in SHARED if option not in options]
        assert not missing, f"{name} lacks {missing}"
        for option in SHARED:  # the same declaration: flags, help and default
            assert options[option].opts == first[option].opts, (name, option)
            assert options[option].help == first[option].help, (name, option)
            assert options[option].default == first[option].default, (name, option)
    assert "images" in _options("sanity") and "images" in _options("verify")


def _model(tmp_path, *, rescaling: bool):
    """(8, 8, 3) -> [Rescaling] -> Conv2D(4) -> GAP -> Dense(3, softmax), seeded, saved."""
    keras.utils.set_random_seed(3)
    layers = [keras.Input((8, 8, 3))]
    if rescaling:
        layers.append(keras.layers.Rescaling(1 / 255))
    layers += [keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
               keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")]
    model = keras.Sequential(layers)
    path = tmp_path / f"model_{int(rescaling)}.keras"
    model.save(path)
    return model, path


def _images(tmp_path, count: int = 4, size=(8, 8)):
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    pixels = rng.integers(0, 256, (count, *size, 3), dtype=np.uint8)
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{index}.png")
    return folder, pixels.astype(np.float32)


def _csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_class_names_name_the_predicted_classes_from_a_list_or_a_file(tmp_path):
    model, path = _model(tmp_path, rescaling=True)
    folder, pixels = _images(tmp_path)
    names = ["cat", "dog", "bird"]
    expected = [names[index] for index in np.argmax(model(pixels).numpy(), axis=1)]
    (tmp_path / "names.txt").write_text("cat\ndog\n\nbird\n")
    for spec in ("cat,dog,bird", str(tmp_path / "names.txt")):
        result = runner.invoke(app, ["predict", str(path), "--images", str(folder),
                                     "--class-names", spec])
        assert result.exit_code == 0, result.output
        assert [row["predicted"] for row in _csv(result.stdout)] == expected


def test_a_class_name_count_that_does_not_match_is_one_line_naming_both(tmp_path):
    _, path = _model(tmp_path, rescaling=True)
    folder, _ = _images(tmp_path)
    for command in (["predict", str(path), "--images", str(folder)],
                    ["gradcam", str(path), "--images", str(folder), "--out", str(tmp_path / "g")]):
        result = runner.invoke(app, [*command, "--class-names", "cat,dog"])
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert lines == [("error: --class-names 'cat,dog' gives 2 names but the model has 3 "
                          "classes")], result.output
    assert not (tmp_path / "g").exists()


def test_a_run_directory_keeps_its_recorded_names(tmp_path):
    from cnnviz.errors import CnnvizError
    from cnnviz.report.selection import given_class_names
    from cnnviz.runs.load import Run

    model, _ = _model(tmp_path, rescaling=True)
    with pytest.raises(CnnvizError, match="uses the class names it recorded"):
        given_class_names(Run(model, None, tmp_path), "a,b,c")
    assert given_class_names(Run(model, None, None), " a, b ,c") == ["a", "b", "c"]


def test_preprocess_reaches_the_trust_checks(tmp_path):
    """faithfulness --preprocess unit scores the model on pixels / 127.5 - 1, computed here,
    with black at -1 for the methods that fill or mask (occlusion, RISE, Score-CAM, IG)."""
    from cnnviz.trust.faithfulness import deletion_insertion

    model, path = _model(tmp_path, rescaling=False)
    folder, pixels = _images(tmp_path)
    results = {}
    for mode in ("unit", "scale"):
        result = runner.invoke(app, ["faithfulness", str(path), "--images", str(folder),
                                     "--preprocess", mode, "--steps", "4", "--json",
                                     "--out", str(tmp_path / mode)])
        assert result.exit_code == 0, result.output
        results[mode] = json.loads(result.stdout)["results"]
    unit_range = (np.full(3, -1.0, np.float32), np.full(3, 1.0, np.float32))
    by_hand = deletion_insertion(model, pixels / 127.5 - 1.0, steps=4,
                                 input_range=unit_range).to_dict()
    for method, scores in by_hand["methods"].items():
        assert results["unit"]["methods"][method]["deletion_auc"] == pytest.approx(
            scores["deletion_auc"], abs=1e-6), method
    assert results["unit"]["methods"] != results["scale"]["methods"]


def test_resize_crop_in_predict_takes_the_centre_of_a_tall_image(tmp_path):
    model, path = _model(tmp_path, rescaling=True)
    folder, pixels = _images(tmp_path, size=(12, 8))  # 12 high, 8 wide: crop rows 2..10
    expected = model(pixels[:, 2:10]).numpy()
    result = runner.invoke(app, ["predict", str(path), "--images", str(folder), "--resize",
                                 "crop", "--top-k", "1"])
    assert result.exit_code == 0, result.output
    rows = _csv(result.stdout)
    assert [int(row["predicted"]) for row in rows] == list(np.argmax(expected, axis=1))
    np.testing.assert_allclose([float(row["probability"]) for row in rows],
                               expected.max(axis=1), atol=1e-5)


def test_feature_maps_save_the_activations_they_draw(tmp_path):
    model, path = _model(tmp_path, rescaling=True)
    folder, pixels = _images(tmp_path, count=2)
    out = tmp_path / "maps"
    result = runner.invoke(app, ["feature-maps", str(path), "--images", str(folder),
                                 "--save-arrays", "--max-channels", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    conv = keras.Model(model.inputs, model.get_layer("conv").output)
    for index in range(2):
        saved = np.load(out / f"{index}_conv.npz")
        channels = saved["conv.channels"]
        activations = conv(pixels[index:index + 1]).numpy()[0]
        assert len(channels) == 2
        # the most active channels first (mean |activation|), as the figure says
        strength = np.abs(activations).mean(axis=(0, 1))
        assert list(channels) == list(np.argsort(-strength, kind="stable")[:2])
        np.testing.assert_allclose(saved["conv"], activations[..., channels], atol=1e-5)


def test_filters_save_the_kernels_they_draw(tmp_path):
    model, path = _model(tmp_path, rescaling=True)
    out = tmp_path / "filters"
    result = runner.invoke(app, ["filters", str(path), "--save-arrays", "--out", str(out)])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(out / "conv.npz")["kernels"],
                                  model.get_layer("conv").get_weights()[0])


def test_activation_max_maximizes_the_classes_it_names(tmp_path):
    """--classes 2,0: image k scores its own class above the other image's score of it."""
    model, path = _model(tmp_path, rescaling=True)
    out = tmp_path / "am"
    result = runner.invoke(app, ["activation-max", str(path), "--classes", "2,0", "--steps", "48",
                                 "--save-arrays", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = np.load(out / "classes.npz")
    assert list(saved["indices"]) == [2, 0]
    logits = keras.Model(model.inputs, model.layers[-1].output)  # softmax: rank equals logit's
    scores = logits(saved["images"]).numpy()
    assert scores[0, 2] > scores[1, 2] and scores[1, 0] > scores[0, 0], scores


# ------------------------------------------------------------------ --shard K/N
def test_shards_of_an_explain_command_write_the_files_of_one_process(tmp_path):
    _, path = _model(tmp_path, rescaling=True)
    folder, _ = _images(tmp_path, count=5)
    whole, shares = tmp_path / "whole", tmp_path / "shares"
    common = ["gradcam", str(path), "--images", str(folder), "--save-arrays"]
    assert runner.invoke(app, [*common, "--out", str(whole)]).exit_code == 0
    for index in range(3):
        result = runner.invoke(app, [*common, "--shard", f"{index}/3", "--out", str(shares)])
        assert result.exit_code == 0, result.output
    names = sorted(file.name for file in whole.iterdir())
    assert names == sorted(file.name for file in shares.iterdir()) and len(names) == 10
    for name in names:
        if name.endswith(".npz"):
            one, other = np.load(whole / name), np.load(shares / name)
            for key in one.files:
                np.testing.assert_array_equal(one[key], other[key])


def test_predict_shards_concatenate_into_the_csv_of_one_process(tmp_path):
    _, path = _model(tmp_path, rescaling=True)
    folder, _ = _images(tmp_path, count=7)
    common = ["predict", str(path), "--images", str(folder)]
    whole = runner.invoke(app, [*common, "--csv", str(tmp_path / "all.csv")])
    assert whole.exit_code == 0, whole.output
    for index in range(3):
        result = runner.invoke(app, [*common, "--shard", f"{index}/3", "--csv",
                                     str(tmp_path / "part.csv")])
        assert result.exit_code == 0, result.output
    parts = sorted(tmp_path.glob("part.shard-*-of-3.csv"))
    assert [part.name for part in parts] == [f"part.shard-{k}-of-3.csv" for k in range(3)]
    assert "".join(part.read_text() for part in parts) == (tmp_path / "all.csv").read_text()


def test_evaluate_shards_merge_into_the_report_of_one_process(tmp_path):
    _, path = _model(tmp_path, rescaling=True)
    rng = np.random.default_rng(5)
    data = tmp_path / "labelled"
    for index in range(40):
        label = ["a", "b", "c"][index % 3]
        (data / label).mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(image).save(data / label / f"{index:02d}.png")
    common = ["evaluate", str(path), "--data", str(data)]
    whole = runner.invoke(app, [*common, "--out", str(tmp_path / "whole"), "--json"])
    assert whole.exit_code == 0, whole.output
    for index in range(4):
        result = runner.invoke(app, [*common, "--shard", f"{index}/4", "--out",
                                     str(tmp_path / "shares")])
        assert result.exit_code == 0, result.output
    early = runner.invoke(app, [*common, "--merge", "--out", str(tmp_path / "empty")])
    assert early.exit_code == 2 and "--shard K/N first" in early.output
    merged = runner.invoke(app, [*common, "--merge", "--out", str(tmp_path / "shares"), "--json"])
    assert merged.exit_code == 0, merged.output
    one, joined = (json.loads((tmp_path / name / "evaluation.json").read_text())
                   for name in ("whole", "shares"))
    one.pop("seconds"), joined.pop("seconds")
    assert joined == one
    assert one["images"] == 40 and len(one["most_confident_mistakes"]) == 16
    assert ((tmp_path / "whole" / "mistakes.png").read_bytes()
            == (tmp_path / "shares" / "mistakes.png").read_bytes())


def test_a_shard_spec_outside_its_range_is_one_line(tmp_path):
    _, path = _model(tmp_path, rescaling=True)
    folder, _ = _images(tmp_path, count=2)
    for spec, expected in (("3/3", "K must be 0..N-1"), ("1-3", "is not K/N"),
                           ("0/3", "leave this share empty")):
        result = runner.invoke(app, ["predict", str(path), "--images", str(folder), "--shard",
                                     spec])
        assert result.exit_code == 2 and expected in result.output, (spec, result.output)
