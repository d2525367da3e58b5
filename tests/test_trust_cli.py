"""The trust commands from the command line: verify, sanity, faithfulness, shortcut."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnviz.cli import app
from cnnviz.explain.registry import METHODS

ROOT = Path(__file__).parent.parent
runner = CliRunner()
pytestmark = pytest.mark.slow


def _invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


@pytest.mark.parametrize("name", ["digits", "mnist", "toy4x4", "lenet5", "cifar10", "shortcut"])
def test_verify_every_shipped_config_within_1e_4(name):
    result = _invoke("verify", ROOT / "configs" / f"{name}.yaml")
    assert result.exit_code == 0, result.output
    assert "OK: all" in result.output and "within 1e-04" in result.output


def test_verify_a_trained_run_and_fail_on_a_tolerance_it_cannot_meet(digits_run):
    passed = _invoke("verify", digits_run, "--images", "0:16")
    assert passed.exit_code == 0, passed.output
    assert "conv1" in passed.output and "preds" in passed.output
    failed = _invoke("verify", digits_run, "--images", "0:16", "--tolerance", "1e-12")
    assert failed.exit_code == 1
    assert "FAILED" in failed.output


def test_verify_explain_writes_the_toy_model_out_by_hand():
    result = _invoke("verify", ROOT / "configs" / "toy4x4.yaml", "--explain")
    assert result.exit_code == 0, result.output
    for step in ("window", "relu", "max", "sigmoid"):
        assert step in result.output.lower(), step


def test_sanity_writes_table_json_and_figures(digits_run, tmp_path):
    result = _invoke("sanity", digits_run, "--images", "0:8", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    numbers = json.loads((tmp_path / "sanity.json").read_text())
    methods = numbers["model_randomization"]["methods"]
    assert list(methods) == list(METHODS) and "class_sensitivity" in numbers
    steps = numbers["model_randomization"]["steps"]
    assert steps == ["preds", "dense", "conv2", "conv1"]  # the layers with weights, top down
    for name, entry in methods.items():  # every method judged at every step
        assert len(entry["similar_per_step"]) == len(steps), name
    # Known by construction: Eigen-CAM of pool2 is computed below dense, so randomizing preds
    # and dense cannot change it, and it never looks at the class.
    eigencam = methods["eigencam"]
    assert eigencam["rank_correlation"][:2] == pytest.approx([1.0, 1.0])
    assert eigencam["similar_per_step"][:2] == [True, True]
    assert eigencam["insensitive_to"][:2] == ["preds", "dense"]
    assert numbers["class_sensitivity"]["methods"]["eigencam"]["class_insensitive"] is True
    assert "eigencam" in result.output and "INSENSITIVE to preds" in result.output
    for name in ("sanity_maps.png", "sanity_curves.png", "sanity.txt"):
        assert (tmp_path / name).is_file()


def test_faithfulness_writes_table_json_and_curves(digits_run, tmp_path):
    result = _invoke("faithfulness", digits_run, "--images", "0:8", "--steps", "8",
                     "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "random" in result.output and "deletion" in result.output.lower()
    numbers = json.loads((tmp_path / "faithfulness.json").read_text())
    assert list(numbers["methods"]) == [*METHODS, "random"]
    assert (tmp_path / "faithfulness.png").is_file()


def test_shortcut_on_data_without_a_cue_says_so(digits_run):
    result = _invoke("shortcut", digits_run)
    assert result.exit_code == 2
    assert "spurious cue" in result.output and "Traceback" not in result.output


def test_shortcut_run_reports_the_cue_in_numbers(tmp_path):
    """`cnnviz run configs/shortcut.yaml`, smaller: the report and the index carry the verdict.

    --smoke (the fast trust methods, 16 shortcut images; every method's shortcut numbers are
    test_shortcut's) with the config's 5 epochs back: 900 images (461 trained on) still teach
    the mark."""
    result = _invoke("run", ROOT / "configs" / "shortcut.yaml", "--out", tmp_path, "--smoke",
                     "--set", "train.epochs=5", "--set", "data.shapes.count=900",
                     "--set", "train.verbose=0", "--images", "0:3")
    assert result.exit_code == 0, result.output
    run_dir = next((tmp_path / "shortcut").iterdir())
    report = json.loads((run_dir / "figures" / "shortcut" / "shortcut.json").read_text())
    assert report["train_accuracy"] > 0.95
    assert report["test_accuracy"] < report["train_accuracy"] - 0.3, "the cue does not transfer"
    assert report["relies_on_cue"] is True
    assert "relies on" in result.output
    assert "shortcut/shortcut.png" in (run_dir / "index.html").read_text()
