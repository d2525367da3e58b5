"""Quality gates and JUnit reports: parsing, metric names, values, outcomes, the XML's structure."""

import math
from pathlib import Path
from xml.etree import ElementTree

import pytest

from cnnviz.ci.gates import (
    Check,
    check_expectations,
    check_names,
    evaluation_values,
    format_outcomes,
    report_checks,
    trust_checks,
    trust_values,
)
from cnnviz.ci.junit import junit_xml
from cnnviz.config.expect import Expectation, parse_expectation, parse_expectations
from cnnviz.config.loading import load_config
from cnnviz.errors import CnnvizError, ConfigError

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(("text", "expected"), [
    ("test_accuracy>=0.95", Expectation("test_accuracy", ">=", 0.95)),
    (" test_loss < 0.2 ", Expectation("test_loss", "<", 0.2)),
    ("evaluation.recall.T-shirt/top>0.5", Expectation("evaluation.recall.T-shirt/top", ">", 0.5)),
    ("epochs==1", Expectation("epochs", "==", 1.0)),
    ("sanity.gradcam.rank_correlation<=3e-1", Expectation("sanity.gradcam.rank_correlation", "<=",
                                                           0.3)),
    ("seconds!=0", Expectation("seconds", "!=", 0.0)),
])
def test_parse_expectation(text, expected):
    assert parse_expectation(text) == expected


@pytest.mark.parametrize(("text", "words"), [
    ("test_accuracy=>0.9", ["'test_accuracy=>0.9'", "METRIC OP NUMBER", ">="]),
    ("test_accuracy>=high", ["'high' is not a number"]),
    ("test_accuracy>=nan", ["not NaN"]),
    (">=0.9", ["METRIC OP NUMBER"]),
    ("test_accuracy", ["METRIC OP NUMBER"]),
])
def test_malformed_expectations_are_named(text, words):
    with pytest.raises(CnnvizError) as caught:
        parse_expectation(text)
    for word in words:
        assert word in str(caught.value)


def test_config_expect_list_is_validated_with_its_location(tmp_path):
    path = tmp_path / "gated.yaml"
    path.write_text("model: {layers: [{type: flatten}]}\nexpect: ['test_accuracy>=0.9', 'x=>1']\n")
    with pytest.raises(ConfigError, match=r"expect: item 1 'x=>1': expected METRIC OP NUMBER"):
        load_config(path)


def test_config_and_cli_expectations_combine_without_duplicates():
    combined = parse_expectations(["test_loss<0.2", "test_accuracy>=0.9"], ["test_accuracy>=0.9"])
    assert [e.text for e in combined] == ["test_accuracy>=0.9", "test_loss<0.2"]


def test_nan_never_passes_a_gate():
    assert not Expectation("x", "<=", 1.0).holds(math.nan)
    assert not Expectation("x", "!=", 1.0).holds(math.nan)


def _digits():
    return load_config(ROOT / "configs" / "digits.yaml")


@pytest.mark.parametrize("metric", [
    "test_accuracy", "test_loss", "epochs", "seconds", "evaluation.accuracy",
    "evaluation.top_k_accuracy", "evaluation.macro_f1", "evaluation.recall.3",
    "evaluation.precision.7", "sanity.gradcam.rank_correlation", "sanity.saliency.ssim",
    "sanity.guided.class_correlation", "faithfulness.gradcam.deletion_auc",
    "faithfulness.random.insertion_auc",
])
def test_known_metric_names_pass_for_run(metric):
    check_names([Expectation(metric, ">=", 0.0)], command="run", config=_digits())


@pytest.mark.parametrize(("metric", "command", "words"), [
    ("test_acuracy", "run", ["unknown metric 'test_acuracy'", "test_accuracy"]),
    ("accuracy", "run", ["unknown metric 'accuracy'", "evaluation.<name>"]),
    ("test_auc", "run", ["unknown metric 'test_auc'"]),  # digits trains with accuracy only
    ("evaluation.acuracy", "run", ["evaluation.accuracy", "evaluation.{precision,recall,f1}"]),
    ("sanity.gradcam.rank", "run", ["sanity.<method>.{rank_correlation,ssim,class_correlation}"]),
    ("sanity.gradcan.ssim", "run", ["<method> one of saliency", "gradcam"]),
    ("faithfulness.gradcam.auc", "run", ["deletion_auc,insertion_auc", "random"]),
    ("shortcut.cue_reliance", "run", ["spurious cue"]),
    ("sanity.gradcam.ssim", "train", ["computed by `cnnviz run`, not by `cnnviz train`"]),
    ("test_accuracy", "evaluate", ["evaluation.* metrics only"]),
    ("faithfulness.gradcam.deletion_auc", "sanity", ["`cnnviz sanity` computes sanity.*"]),
    ("sanity.guided.ssim", "faithfulness", ["`cnnviz faithfulness` computes faithfulness.*"]),
    ("test_accuracy", "sanity", ["sanity.* metrics only"]),
    ("sanity.guided.sim", "sanity", ["sanity.<method>.{rank_correlation,ssim"]),
    ("loss.value", "run", ["faithfulness., shortcut. or explain."]),
    ("evaluation.recall.seven", "train", ["no class 'seven'", "0, 1, 2", "indices 0..9"]),
    ("evaluation.f1.10", "run", ["no class '10'"]),
])
def test_unknown_metric_names_are_refused_with_the_valid_ones(metric, command, words):
    with pytest.raises(CnnvizError) as caught:
        check_names([Expectation(metric, ">=", 0.0)], command=command, config=_digits())
    for word in words:
        assert word in str(caught.value)


def test_the_trust_commands_take_their_own_metric_names():
    check_names([Expectation("sanity.guided.class_correlation", "<=", 0.9)], command="sanity")
    check_names([Expectation("faithfulness.random.deletion_auc", ">=", 0.1)],
                command="faithfulness")


def test_class_names_are_known_before_loading_the_data(tmp_path):
    for name in ("b", "a", ".hidden"):
        (tmp_path / name).mkdir()
    folder = load_config(ROOT / "configs" / "digits.yaml",
                         ["data.source=directory", f"data.path={tmp_path}", "data.image_size=null"])
    check_names([Expectation("evaluation.recall.a", ">", 0.5)], command="train", config=folder)
    with pytest.raises(CnnvizError, match="the classes are a, b"):
        check_names([Expectation("evaluation.recall.c", ">", 0.5)], command="train",
                    config=folder)
    cifar = load_config(ROOT / "configs" / "cifar10.yaml")
    check_names([Expectation("evaluation.f1.truck", ">", 0.5)], command="run", config=cifar)


def test_shortcut_metrics_exist_for_data_with_a_cue_and_auc_when_trained_with_it():
    shortcut = load_config(ROOT / "configs" / "shortcut.yaml", ["train.metrics=[accuracy,auc]"])
    check_names([Expectation("shortcut.cue_reliance", "<=", 0.2),
                 Expectation("shortcut.gradcam.lift", "<", 3.0),
                 Expectation("test_auc", ">", 0.5)], command="run", config=shortcut)


SANITY = {
    "model_randomization": {"threshold": 0.5, "methods": {
        "saliency": {"rank_correlation": [0.9, 0.4, 0.1], "ssim": [0.8, 0.3, 0.05],
                     "insensitive": False},
        "guided": {"rank_correlation": [0.95, 0.9, 0.7], "ssim": [0.9, 0.8, 0.6],
                   "insensitive": True},
        "gradcam": {"rank_correlation": [0.9, 0.2, 0.1], "ssim": [0.9, 0.2, 0.1],
                    "insensitive": False, "insensitive_to": ["preds"]}}},
    "class_sensitivity": {"threshold": 0.9, "methods": {
        "saliency": {"rank_correlation": 0.3, "class_insensitive": False},
        "guided": {"rank_correlation": 0.95, "class_insensitive": True}}},
}
FAITHFULNESS = {"methods": {
    "saliency": {"deletion_auc": 0.2, "insertion_auc": 0.6, "no_better_than_random": []},
    "gradcam": {"deletion_auc": 0.45, "insertion_auc": 0.5, "no_better_than_random": ["deletion"]},
    "random": {"deletion_auc": 0.4, "insertion_auc": 0.4, "no_better_than_random": []}}}
SHORTCUT = {"train_accuracy": 1.0, "test_accuracy": 0.4, "relies_on_cue": True,
            "verdict": "relies on the corner mark", "methods": {
                "saliency": {"cue_share": 0.3, "lift": 8.0, "concentration": 0.25},
                "gradcam": {"cue_share": 0.6, "lift": 15.0, "concentration": 0.55}}}


def test_trust_values_take_the_last_randomization_step_and_the_largest_concentration():
    values = trust_values(SANITY, FAITHFULNESS, SHORTCUT)
    assert values["sanity.saliency.rank_correlation"] == 0.1
    assert values["sanity.guided.ssim"] == 0.6
    assert values["sanity.guided.class_correlation"] == 0.95
    assert values["faithfulness.gradcam.deletion_auc"] == 0.45
    assert values["faithfulness.random.insertion_auc"] == 0.4
    assert values["shortcut.cue_reliance"] == 0.55
    assert values["shortcut.test_accuracy"] == 0.4


def test_trust_checks_one_per_method_and_test_flagged_where_the_report_says():
    checks = trust_checks(SANITY, FAITHFULNESS, SHORTCUT)
    assert all(check.passed for check in checks), "a finding alone is no failure"
    verdicts = {(check.suite, check.name): not check.flagged for check in checks}
    assert verdicts == {
        ("sanity", "model randomization: saliency"): True,
        ("sanity", "model randomization: guided"): False,
        ("sanity", "model randomization: gradcam"): False,  # a per-step verdict
        ("sanity", "class sensitivity: saliency"): True,
        ("sanity", "class sensitivity: guided"): False,
        ("faithfulness", "better than random: saliency"): True,
        ("faithfulness", "better than random: gradcam"): False,
        ("shortcut", "does not rely on the spurious cue"): False,
    }
    metrics = {check.name: check.metrics for check in checks}
    assert metrics["model randomization: guided"] == ("sanity.guided.rank_correlation",
                                                      "sanity.guided.ssim")
    assert metrics["class sensitivity: guided"] == ("sanity.guided.class_correlation",)
    assert metrics["better than random: gradcam"] == ("faithfulness.gradcam.deletion_auc",
                                                      "faithfulness.gradcam.insertion_auc")
    assert "shortcut.cue_reliance" in metrics["does not rely on the spurious cue"]
    assert "shortcut.gradcam.lift" in metrics["does not rely on the spurious cue"]
    values = trust_values(SANITY, FAITHFULNESS, SHORTCUT)
    assert all(name in values for names in metrics.values() for name in names), (
        "every metric a check names is a gate the run has")


def _failures(root) -> dict:
    """{test case name: its failure element} of a parsed JUnit report."""
    return {case.get("name"): case.find("failure") for case in root.iter("testcase")
            if case.find("failure") is not None}


def _case(root, name: str):
    [case] = [case for case in root.iter("testcase") if case.get("name") == name]
    return case, {entry.get("name"): entry.get("value")
                  for entry in case.findall("properties/property")}


def test_a_report_fails_a_finding_only_with_the_failed_expectation_that_names_it():
    checks = trust_checks(SANITY, FAITHFULNESS, SHORTCUT)
    values = trust_values(SANITY, FAITHFULNESS, SHORTCUT)
    # No gate: five findings, no failure (the command exits 0).
    ungated = ElementTree.fromstring(junit_xml(report_checks([], checks)))
    assert ungated.get("failures") == "0" and not _failures(ungated)
    case, properties = _case(ungated, "model randomization: guided")
    guided = next(check for check in checks if check.name == "model randomization: guided")
    assert properties == {"flagged": "true", "finding": guided.message,
                          "metrics": "sanity.guided.rank_correlation, sanity.guided.ssim"}
    assert guided.message in case.find("system-out").text
    assert case.find("system-out").text.startswith("flagged")
    case, properties = _case(ungated, "model randomization: saliency")
    assert properties == {"flagged": "false", "metrics": ("sanity.saliency.rank_correlation, "
                                                         "sanity.saliency.ssim")}
    assert not case.find("system-out").text.startswith("flagged")
    # sanity.guided.ssim is 0.6: its gate fails, and with it the finding it names, not the
    # guided class-sensitivity finding (a gate on class_correlation that holds) nor the rest.
    outcomes = check_expectations(parse_expectations(
        ["sanity.guided.ssim<=0.3", "sanity.guided.class_correlation<=0.99",
         "faithfulness.saliency.deletion_auc<=0.3", "faithfulness.gradcam.insertion_auc>=0.9"]),
        values)
    assert [outcome.passed for outcome in outcomes] == [False, True, True, False]
    report = report_checks(outcomes, [*checks, Check("verify", "conv1 (Conv2D)", False, "off")])
    assert [check.name for check in report[:4]] == [outcome.expectation.text
                                                     for outcome in outcomes]
    root = ElementTree.fromstring(junit_xml(report))
    failures = _failures(root)
    assert set(failures) == {"sanity.guided.ssim<=0.3", "model randomization: guided",
                             "faithfulness.gradcam.insertion_auc>=0.9",
                             "better than random: gradcam", "conv1 (Conv2D)"}
    assert root.get("failures") == "5"
    gated = failures["model randomization: guided"]
    assert gated.get("type") == "TrustCheckFlagged"
    assert gated.get("message") == f"{guided.message}; gated by --expect sanity.guided.ssim<=0.3"
    assert _case(root, "model randomization: guided")[1]["flagged"] == "true"
    assert failures["sanity.guided.ssim<=0.3"].get("type") == "ExpectationFailed"
    assert failures["conv1 (Conv2D)"].get("message") == "off", "a verify failure stays one"
    case, properties = _case(root, "class sensitivity: guided")
    assert properties["flagged"] == "true" and case.find("failure") is None
    assert _case(root, "does not rely on the spurious cue")[0].find("failure") is None


def test_evaluation_values_by_class_name_and_index():
    values = evaluation_values({"accuracy": 0.9, "top_k_accuracy": 1.0, "macro_f1": 0.8,
                                "images": 10, "per_class": {
                                    "cat": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3},
                                    "dog": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3},
                                    "cow": {"precision": 0.0, "recall": None, "f1": None}}})
    assert values["evaluation.recall.cat"] == values["evaluation.recall.0"] == 0.5
    assert values["evaluation.precision.dog"] == values["evaluation.precision.1"] == 0.5
    assert values["evaluation.images"] == 10
    assert math.isnan(values["evaluation.recall.cow"]), "undefined (no cow in the data): NaN"


def test_outcomes_table_and_a_metric_the_run_lacks():
    outcomes = check_expectations([Expectation("test_accuracy", ">=", 0.95),
                                   Expectation("test_loss", "<", 0.2)],
                                  {"test_accuracy": 0.97, "test_loss": 0.31})
    assert [outcome.passed for outcome in outcomes] == [True, False]
    table = format_outcomes(outcomes)
    assert "test_accuracy>=0.95" in table and "0.97" in table and "PASS" in table
    assert "test_loss<0.2" in table and "0.31" in table and "FAIL" in table
    assert table.splitlines()[-1] == "1 of 2 expectations FAILED"
    with pytest.raises(CnnvizError, match=r"no metric 'evaluation.recall.cow' \(classes: cat"):
        check_expectations([Expectation("evaluation.recall.cow", ">", 0.5)],
                           {"evaluation.f1.cat": 1.0, "evaluation.recall.cat": 1.0})


def test_junit_xml_has_the_required_structure_and_counts():
    checks = [Check("expectations", "test_accuracy>=0.95", True, "test_accuracy = 0.97"),
              Check("expectations", "test_loss<0.2", False, "test_loss = 0.31 <&> \"quoted\""),
              *trust_checks(SANITY, FAITHFULNESS, SHORTCUT, seconds={"sanity": 2.0})]
    root = ElementTree.fromstring(junit_xml(checks, properties={"config": "digits.yaml"},
                                            timestamp=0))
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("10", "1", "0")
    suites = root.findall("testsuite")
    assert [suite.get("name") for suite in suites] == [
        "cnnviz.expectations", "cnnviz.sanity", "cnnviz.faithfulness", "cnnviz.shortcut"]
    for suite in suites:
        for attribute in ("name", "tests", "failures", "errors", "skipped", "time", "timestamp",
                          "hostname", "id"):
            assert suite.get(attribute) is not None, attribute
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == sum(case.find("failure") is not None for case in cases)
        tags = [child.tag for child in suite]
        assert tags[0] == "properties" and tags[-2:] == ["system-out", "system-err"]
        assert suite.find("properties/property").attrib == {"name": "config",
                                                            "value": "digits.yaml"}
        for case in cases:
            assert case.get("name") and case.get("classname") == suite.get("name")
            float(case.get("time"))
            failure = case.find("failure")
            if failure is not None:
                assert failure.get("message") and failure.get("type")
    sanity = suites[1]
    assert (sanity.get("tests"), sanity.get("failures")) == ("5", "0")
    assert math.isclose(float(sanity.get("time")), 2.0, abs_tol=1e-3)
    failed = suites[0].findall("testcase")[1].find("failure")
    assert failed.get("type") == "ExpectationFailed"
    assert failed.get("message") == "test_loss = 0.31 <&> \"quoted\""  # escaped, read back intact
    assert suites[0].findall("testcase")[0].find("system-out").text == "test_accuracy = 0.97"


def test_junit_without_checks_is_an_empty_but_valid_report():
    root = ElementTree.fromstring(junit_xml([]))
    assert root.tag == "testsuites" and root.get("tests") == "0" and not root.findall("testsuite")
