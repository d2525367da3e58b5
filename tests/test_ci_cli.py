"""CI use from the command line: --expect exit codes, --json on stdout, --junit files, evaluate."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cnnviz.cli import app

ROOT = Path(__file__).parent.parent
runner = CliRunner()
# digits at its native 8x8, one epoch: seconds of training.
QUICK = ["--set", "data.image_size=null", "--set", "train.epochs=1"]


def _cnnviz(*args, cwd=None):
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cnnviz.cli", *map(str, args)], check=False,
                          capture_output=True, text=True, env=environment, cwd=cwd, timeout=600)


def _junit(path: Path) -> dict:
    """{suite name: {test case name: passed}} of a JUnit file, its counts checked on the way."""
    root = ElementTree.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = {}
    for suite in root.findall("testsuite"):
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == sum(case.find("failure") is not None
                                                 for case in cases)
        suites[suite.get("name")] = {case.get("name"): case.find("failure") is None
                                     for case in cases}
    assert int(root.get("tests")) == sum(len(cases) for cases in suites.values())
    assert int(root.get("failures")) == sum(not passed for cases in suites.values()
                                            for passed in cases.values())
    return suites


def _findings(path: Path) -> dict:
    """{test case name: its <properties> as a dict} of the trust checks in a JUnit file."""
    return {case.get("name"): {entry.get("name"): entry.get("value")
                               for entry in case.findall("properties/property")}
            for case in ElementTree.parse(path).getroot().iter("testcase")
            if case.find("properties") is not None}


def _failures(path: Path) -> int:
    return int(ElementTree.parse(path).getroot().get("failures"))


@pytest.mark.parametrize(("expect", "message"), [
    ("test_acuracy>=0.9", "unknown metric 'test_acuracy'"),
    ("sanity.gradcam.rank_correlation<=0.3", "computed by `cnnviz run`, not by `cnnviz train`"),
    ("test_accuracy=>0.9", "expected METRIC OP NUMBER"),
])
def test_an_unknown_or_malformed_gate_exits_2_before_training(tmp_path, expect, message):
    result = runner.invoke(app, ["train", str(ROOT / "configs" / "digits.yaml"), "--out",
                                 str(tmp_path), "--expect", expect], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        line for line in result.output.splitlines() if line.strip()]
    assert message in result.output
    assert not any(tmp_path.iterdir()), "nothing was trained"


def test_a_user_error_with_json_is_a_json_object_too(tmp_path):
    result = runner.invoke(app, ["train", str(ROOT / "configs" / "digits.yaml"), "--out",
                                 str(tmp_path), "--expect", "nope>1", "--json"])
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["exit_code"] == 2
    assert "unknown metric 'nope'" in payload["error"]
    assert "error: --expect: unknown metric 'nope'" in result.stderr


@pytest.mark.slow
def test_train_gates_json_and_junit_in_a_real_process(tmp_path):
    config = tmp_path / "gated.yaml"
    config.write_text((ROOT / "configs" / "digits.yaml").read_text()
                      + "expect: ['epochs==1']\n")
    junit = tmp_path / "reports" / "junit.xml"
    result = _cnnviz("train", config, *QUICK, "--out", tmp_path / "runs", "--json",
                     "--junit", junit, "--expect", "test_accuracy>=0.1",
                     "--expect", "test_loss<0.0001", "--expect", "evaluation.macro_f1>0")
    assert result.returncode == 1, result.stderr  # test_loss<0.0001 cannot hold after one epoch
    payload = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert payload["ok"] is False and payload["exit_code"] == 1
    assert [(e["expectation"], e["passed"]) for e in payload["expectations"]] == [
        ("epochs==1", True), ("test_accuracy>=0.1", True), ("test_loss<0.0001", False),
        ("evaluation.macro_f1>0", True)]
    run_dir = Path(payload["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert payload["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert payload["expectations"][1]["value"] == metrics["test_accuracy"]
    assert payload["evaluation"]["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert str(run_dir / "model.keras") in payload["files"]
    assert all(Path(path).is_file() for path in payload["files"])
    assert payload["timings"]["total_s"] >= payload["timings"]["train_s"] > 0
    # Human text, Keras's progress bar included, went to stderr.
    assert "test_loss<0.0001" in result.stderr and "FAIL" in result.stderr
    assert "val_loss:" in result.stderr and "test accuracy" in result.stderr
    assert _junit(junit) == {"cnnviz.expectations": {
        "epochs==1": True, "test_accuracy>=0.1": True, "test_loss<0.0001": False,
        "evaluation.macro_f1>0": True}}


@pytest.mark.slow
def test_passing_gates_exit_0_and_print_a_table(digits_run):
    result = runner.invoke(app, ["evaluate", str(digits_run), "--out", str(digits_run / "e2"),
                                 "--expect", "evaluation.accuracy>=0.1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = result.stdout[result.stdout.index("expectation"):]
    assert "evaluation.accuracy>=0.1" in table and "PASS" in table
    assert "all 1 expectations hold" in table


@pytest.mark.slow
def test_evaluate_json_files_and_index_section(digits_run, tmp_path):
    result = runner.invoke(app, ["evaluate", str(digits_run), "--json", "--junit",
                                 str(tmp_path / "j.xml"), "--expect", "evaluation.accuracy>=0.5",
                                 "--expect", "evaluation.recall.3>1.5", "--top-k", "3"],
                           catch_exceptions=False)
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    evaluation = payload["evaluation"]
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert evaluation["images"] == metrics["test_images"]
    assert evaluation["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert evaluation["log_loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)
    assert evaluation["top_k"] == 3 and evaluation["top_k_accuracy"] >= evaluation["accuracy"]
    assert (sum(entry["support"] for entry in evaluation["per_class"].values())
            == evaluation["images"])
    saved = json.loads((digits_run / "evaluation" / "evaluation.json").read_text())
    assert saved["confusion_matrix"] == evaluation["confusion_matrix"]
    assert [e["passed"] for e in payload["expectations"]] == [True, False]
    assert _junit(tmp_path / "j.xml") == {"cnnviz.expectations": {
        "evaluation.accuracy>=0.5": True, "evaluation.recall.3>1.5": False}}
    page = (digits_run / "index.html").read_text()
    assert "Evaluation on the test split" in page and "evaluation/confusion_matrix.png" in page


@pytest.mark.slow
def test_evaluate_on_a_config_of_another_image_size_exits_2(digits_run, tmp_path):
    result = runner.invoke(app, ["evaluate", str(digits_run), "--data",
                                 str(ROOT / "configs" / "digits.yaml"), "--out", str(tmp_path),
                                 "--json"], catch_exceptions=False)
    assert result.exit_code == 2, "digits.yaml is 28x28; the run was trained at 8x8"
    assert "images have shape" in json.loads(result.stdout)["error"]


@pytest.mark.slow
def test_evaluate_on_a_folder_maps_its_classes_by_name(digits_run, tmp_path):
    """A folder with only the classes "3" and "7": its sub-folders are labelled 0 and 1 when
    listed, and must be scored as the model's classes 3 and 7."""
    from PIL import Image

    from cnnviz.runs.load import load_run

    run = load_run(digits_run)
    dataset = run.dataset()
    chosen = {name: np.flatnonzero(dataset.y_test == int(name))[:6] for name in ("3", "7")}
    pixels, truth = [], []
    for name, indices in chosen.items():
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in indices:
            image = np.round(dataset.x_test[index][..., 0]).astype(np.uint8)
            Image.fromarray(image).save(tmp_path / "data" / name / f"{index}.png")
            pixels.append(image[..., None].astype(np.float32))
            truth.append(int(name))
    predicted = run.model.predict(np.stack(pixels), verbose=0).argmax(axis=1)
    result = runner.invoke(app, ["evaluate", str(digits_run), "--data", str(tmp_path / "data"),
                                 "--out", str(tmp_path / "e"), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)["evaluation"]
    support = {name: entry["support"] for name, entry in evaluation["per_class"].items()}
    assert support == {str(digit): 6 if digit in (3, 7) else 0 for digit in range(10)}
    assert evaluation["accuracy"] == pytest.approx(np.mean(predicted == np.array(truth)))
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (np.array(truth), predicted), 1)
    assert evaluation["confusion_matrix"] == expected.tolist()


@pytest.mark.slow
def test_verify_json_and_junit_one_case_per_layer(digits_run, tmp_path):
    result = runner.invoke(app, ["verify", str(digits_run), "--images", "0:8", "--json",
                                 "--junit", str(tmp_path / "verify.xml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    names = [layer["name"] for layer in payload["layers"]]
    assert "conv1" in names and "preds" in names
    assert all(layer["ok"] for layer in payload["layers"])
    assert payload["max_difference"] < 1e-4
    cases = _junit(tmp_path / "verify.xml")["cnnviz.verify"]
    assert len(cases) == len(names) and all(cases.values())


def _workflow_steps() -> dict:
    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "cnnviz-smoke.yml").read_text())
    return {step.get("name", step.get("uses")): step for step in workflow["jobs"]["smoke"]["steps"]}


def test_the_workflow_has_the_recipe_steps():
    steps = _workflow_steps()
    uses = [step.get("uses", "") for step in steps.values()]
    assert any(use.startswith("actions/checkout@") for use in uses)
    setup = next(step for step in steps.values() if step.get("uses", "").startswith(
        "actions/setup-python@"))
    assert setup["with"]["cache"] == "pip"
    assert "pip install" in steps["Install Graphviz and cnnviz"]["run"]
    smoke = steps["Smoke test"]["run"]
    for part in ("cnnviz run configs/digits.yaml", "--smoke", "--expect", "--junit"):
        assert part in smoke
    upload = steps["Upload the run directory"]
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["if"] == "always()"
    assert "cnnviz-outputs/" in upload["with"]["path"]
    readme = (ROOT / "README.md").read_text()
    assert " ".join(smoke.split()) in " ".join(readme.split()), "README shows the same command"


@pytest.mark.slow
def test_the_workflow_smoke_step_passes_and_reports_every_check(tmp_path):
    """The workflow's own `cnnviz run ... --smoke` command, as CI runs it, in a checkout."""
    from cnnviz.cli._common import SMOKE_TRUST_METHODS

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    command = _workflow_steps()["Smoke test"]["run"].rsplit(" > ", 1)
    args, redirect = shlex.split(command[0]), command[1].strip()
    assert args[0] == "cnnviz" and redirect == "cnnviz-results.json"
    result = _cnnviz(*args[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout)
    assert payload["smoke"] is True and all(e["passed"] for e in payload["expectations"])
    metrics = payload["metrics"]
    assert metrics["epochs"] == 1
    assert metrics["test_images"] == 256
    assert Path(payload["run_dir"]).parts[0] == "cnnviz-outputs"
    run_dir = tmp_path / payload["run_dir"]  # relative to the checkout, as --out was
    from cnnviz.runs.load import load_run

    dataset = load_run(run_dir).dataset()  # the subset the run recorded in its config.yaml
    assert len(dataset.y_train) + len(dataset.y_val) == 512 and len(dataset.y_test) == 256
    assert len(dataset.y_train) == metrics["train_images"]
    assert np.bincount(dataset.y_test).min() >= 25, "stratified: every digit ~26 times"
    saliency = list((run_dir / "figures" / "saliency").glob("*.png"))
    assert len(saliency) == 2, "two images per figure"
    suites = _junit(tmp_path / "cnnviz-junit.xml")
    assert list(suites) == ["cnnviz.expectations", "cnnviz.sanity", "cnnviz.faithfulness"]
    assert list(suites["cnnviz.expectations"]) == [
        e["expectation"] for e in payload["expectations"]]
    # --smoke checks the fast methods and those a gate names: randomization + class change.
    assert len(suites["cnnviz.sanity"]) == 2 * len(SMOKE_TRUST_METHODS)
    assert len(suites["cnnviz.faithfulness"]) == len(SMOKE_TRUST_METHODS)
    # Exit 0: no failure in the report; the reports' own verdicts are its findings.
    assert _failures(tmp_path / "cnnviz-junit.xml") == 0
    findings = _findings(tmp_path / "cnnviz-junit.xml")
    sanity = json.loads((run_dir / "figures" / "sanity" / "sanity.json").read_text())
    for method, entry in sanity["model_randomization"]["methods"].items():
        found = findings[f"model randomization: {method}"]
        assert (found["flagged"] == "true") is bool(entry["insensitive_to"])
        assert ("finding" in found) is bool(entry["insensitive_to"])
    assert payload["trust"]["sanity.gradcam.rank_correlation"] == pytest.approx(
        sanity["model_randomization"]["methods"]["gradcam"]["rank_correlation"][-1])
    for key in ("train_s", "figures_s", "trust_s", "evaluate_s", "total_s"):
        assert payload["timings"][key] >= 0
    assert (run_dir / "evaluation" / "confusion_matrix.png").is_file()
    assert "Evaluation on the test split" in (run_dir / "index.html").read_text()
    assert str(Path(payload["run_dir"]) / "index.html") in payload["files"]


def test_sanity_junit_verdicts_on_a_model_built_to_pass_and_fail_them(tmp_path):
    """A hand-set model whose verdicts are known in advance (`_models.quadrant_reader`): class 0
    reads only the top-left quadrant, class 1 only the bottom-right one, through a 1x1 conv.

    Saliency and guided backprop of the two classes live on disjoint quadrants: they pass the
    class-sensitivity test. Eigen-CAM (of the conv layer, the last 4-D one) ignores the class
    and every layer above the conv: it fails both the class test and model randomization, whose
    first two steps (head, hidden) cannot change it. Those are findings: exit 0, and the JUnit
    report has no failure but records them; a failed gate on one fails with the finding it names.
    """
    from _models import QUADRANT_SIZE, quadrant_reader
    from PIL import Image

    model = quadrant_reader(((0, 0), (1, 1)))
    model.save(tmp_path / "quadrants.keras")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        pixels = rng.integers(20, 256, (QUADRANT_SIZE, QUADRANT_SIZE), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    result = runner.invoke(app, ["sanity", str(tmp_path / "quadrants.keras"), "--images",
                                 str(folder), "--out", str(tmp_path / "s"), "--json", "--junit",
                                 str(tmp_path / "s.xml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output  # a sanity verdict is not a gate
    assert _failures(tmp_path / "s.xml") == 0, "the JUnit report follows the exit code"
    cases = _junit(tmp_path / "s.xml")["cnnviz.sanity"]
    assert all(cases.values())
    saved = json.loads((tmp_path / "s" / "sanity.json").read_text())
    verdicts = {f"model randomization: {method}": bool(entry["insensitive_to"])
                for method, entry in saved["model_randomization"]["methods"].items()} | {
                f"class sensitivity: {method}": entry["class_insensitive"]
                for method, entry in saved["class_sensitivity"]["methods"].items()}
    assert verdicts["class sensitivity: eigencam"] and verdicts["model randomization: eigencam"]
    assert not verdicts["class sensitivity: guided"]
    findings = _findings(tmp_path / "s.xml")
    assert {name: found["flagged"] == "true" for name, found in findings.items()} == verdicts
    assert set(findings) == set(cases), "every trust check records its verdict"
    eigencam_class = findings["class sensitivity: eigencam"]
    assert "rank correlation of the top-1 and top-2 class maps 1.000" in eigencam_class["finding"]
    assert eigencam_class["metrics"] == "sanity.eigencam.class_correlation"
    assert "finding" not in findings["class sensitivity: guided"]
    assert findings["class sensitivity: guided"]["flagged"] == "false"
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 0 and all(check["passed"] for check in payload["checks"])
    assert {check["name"]: check["flagged"] for check in payload["checks"]} == verdicts
    assert f"0 failed, {sum(verdicts.values())} flagged" in result.stderr
    assert payload["flagged"] is True
    assert payload["results"] == saved
    eigencam = saved["model_randomization"]["methods"]["eigencam"]
    assert saved["model_randomization"]["steps"] == ["head", "hidden", "conv"]
    assert eigencam["insensitive_to"][:2] == ["head", "hidden"]
    assert eigencam["rank_correlation"][:2] == pytest.approx([1.0, 1.0])
    assert (saved["class_sensitivity"]["methods"]["eigencam"]["rank_correlation"]
            == pytest.approx(1.0))
    assert saved["class_sensitivity"]["methods"]["saliency"]["rank_correlation"] < 0

    # Gated: Eigen-CAM's class correlation (1.0) fails its --expect, and so does the finding it
    # names; the randomization finding (other metrics) and the held gate stay passes.
    gated = runner.invoke(app, ["sanity", str(tmp_path / "quadrants.keras"), "--images",
                                str(folder), "--out", str(tmp_path / "g"), "--json", "--junit",
                                str(tmp_path / "g.xml"), "--expect",
                                "sanity.eigencam.class_correlation<=0.5", "--expect",
                                "sanity.saliency.class_correlation<=0"], catch_exceptions=False)
    assert gated.exit_code == 1, gated.output
    suites = _junit(tmp_path / "g.xml")
    assert suites["cnnviz.expectations"] == {"sanity.eigencam.class_correlation<=0.5": False,
                                             "sanity.saliency.class_correlation<=0": True}
    assert [name for name, passed in suites["cnnviz.sanity"].items() if not passed] == [
        "class sensitivity: eigencam"]
    assert _failures(tmp_path / "g.xml") == 2
    failure = next(case.find("failure") for case in ElementTree.parse(tmp_path / "g.xml").iter(
        "testcase") if case.get("name") == "class sensitivity: eigencam")
    assert failure.get("message").endswith(
        "gated by --expect sanity.eigencam.class_correlation<=0.5")
    assert json.loads(gated.stdout)["exit_code"] == 1


def test_a_trust_command_refuses_another_family_s_gate_before_any_work(tmp_path):
    result = runner.invoke(app, ["faithfulness", str(tmp_path / "missing.keras"), "--expect",
                                 "sanity.guided.ssim<=0.3"])
    assert result.exit_code == 2
    assert "`cnnviz faithfulness` computes faithfulness.* metrics only" in result.output
    assert "missing.keras" not in result.output, "the gate is checked before the model is read"
