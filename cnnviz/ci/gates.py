"""Quality gates for CI: expectations such as `test_accuracy>=0.95`, checked against a run's
numbers.

An expectation names a metric, a comparison and a number. Its metric comes from one of four
places (the README's "Use in CI" section lists them for users):

=================  ===========================================================================
where              metric names
=================  ===========================================================================
metrics.json       test_accuracy, test_loss, test_<m> for each other `train.metrics` entry
                   (test_auc, test_precision, test_recall), epochs, seconds,
                   train_images_per_second, train_images, test_images
evaluation         evaluation.accuracy, evaluation.top_k_accuracy, evaluation.macro_precision,
                   evaluation.macro_recall, evaluation.macro_f1, evaluation.log_loss,
                   evaluation.images, evaluation.precision.<class>, evaluation.recall.<class>,
                   evaluation.f1.<class> (<class>: a class name or index)
sanity (run)       sanity.<method>.rank_correlation, sanity.<method>.ssim (after the last
                   randomization step), sanity.<method>.class_correlation
faithfulness (run) faithfulness.<method>.deletion_auc, faithfulness.<method>.insertion_auc
                   (<method> may also be `random`, the reference order)
explain (train,    explain.<method>.deletion_auc|insertion_auc|cue_share: the last epoch's
 run)              value with `train.explain` set; max(explain...) / min(explain...): the
                   largest / smallest over the epochs explained (explain_history.csv)
shortcut (run)     shortcut.cue_reliance (the largest concentration over methods: 0 = spread
                   evenly, 1 = all on the cue), shortcut.<method>.cue_share|lift|concentration,
                   shortcut.train_accuracy, shortcut.test_accuracy
=================  ===========================================================================

`cnnviz sanity` and `cnnviz faithfulness` take the sanity.* and faithfulness.* names alone.
Names are checked before any training starts: a misspelt gate must not cost a training run.
Trust results (`Check`s) are the other half of a CI report: one line per trust check, written
with the expectations into JUnit XML (`cnnviz.ci.junit`). A report follows the exit code
(`report_checks`): a flagged trust check is a finding, recorded but passing, unless a failed
expectation names one of its metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from cnnviz.config.expect import Expectation, over_epochs
from cnnviz.errors import CnnvizError

# metrics.json keys that are numbers (test_<metric> keys depend on train.metrics).
TRAINING_METRICS = ("test_accuracy", "test_loss", "epochs", "seconds", "train_images_per_second",
                    "train_images", "test_images")
EVALUATION_METRICS = ("accuracy", "top_k_accuracy", "macro_precision", "macro_recall", "macro_f1",
                      "log_loss", "images")
PER_CLASS_METRICS = ("precision", "recall", "f1")
SANITY_METRICS = ("rank_correlation", "ssim", "class_correlation")
FAITHFULNESS_METRICS = ("deletion_auc", "insertion_auc")
SHORTCUT_METRICS = ("cue_reliance", "train_accuracy", "test_accuracy")
SHORTCUT_METHOD_METRICS = ("cue_share", "lift", "concentration")
# Commands that compute one family of metrics: command -> (that family, an example name).
ONE_FAMILY = {"evaluate": ("evaluation", "evaluation.accuracy"),
              "sanity": ("sanity", "sanity.guided.rank_correlation"),
              "faithfulness": ("faithfulness", "faithfulness.gradcam.deletion_auc")}


@dataclass(frozen=True)
class Check:
    """One pass/fail line of a CI report: an expectation or a trust check.

    Attributes:
        suite: the group it belongs to ("expectations", "sanity", "faithfulness", ...).
        name: stable across runs (CI systems track a test's history by its name).
        passed: whether it holds: a failed one is a failure in the report, and the command
            exits 1 (`report_checks` keeps the two in step).
        message: one line with the measured value and the verdict.
        seconds: time spent computing it (0 when unknown).
        flagged: a trust check whose verdict is bad (a finding); it fails only when a failed
            expectation names one of its `metrics`.
        metrics: the gate names (`--expect` metrics) that measure it.
    """

    suite: str
    name: str
    passed: bool
    message: str
    seconds: float = 0.0
    flagged: bool = False
    metrics: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------- names
def check_names(expectations: Iterable[Expectation], *, command: str, config=None) -> None:
    """Raise CnnvizError (one line per unknown name) unless every metric can exist.

    Args:
        expectations: parsed expectations.
        command: "run" (all metric families), "train" (metrics.json and evaluation), or
            "evaluate", "sanity", "faithfulness" (their own family only, `ONE_FAMILY`).
        config: the run's config (its `train.metrics` and data source decide which names
            exist); None skips those checks.
    """
    problems = [problem for expectation in expectations
                if (problem := _name_problem(expectation.metric, command, config))]
    if problems:
        raise CnnvizError("\n".join(problems))


def needs_evaluation(expectations: Iterable[Expectation]) -> bool:
    return any(expectation.metric.startswith("evaluation.") for expectation in expectations)


def _name_problem(metric: str, command: str, config) -> str | None:
    from cnnviz.explain.registry import METHODS

    reduce, metric = over_epochs(metric)
    family, _, rest = metric.partition(".")
    if reduce is not None and family != "explain":
        return (f"--expect {reduce}({metric}): {reduce}(...) takes a per-epoch metric, "
                "explain.<method>.<metric>")
    if family == "explain" and command not in ONE_FAMILY:
        return _explain_name_problem(metric, rest, config)
    if command in ONE_FAMILY and family != ONE_FAMILY[command][0]:
        own, example = ONE_FAMILY[command]
        return (f"--expect {metric!r}: `cnnviz {command}` computes {own}.* metrics only "
                f"(e.g. {example})")
    if not rest:
        known = _training_metrics(config)
        if metric in known:
            return None
        return f"--expect: unknown metric {metric!r}; metrics.json has {', '.join(known)}" + (
            "; evaluation results are named evaluation.<name>" if metric in EVALUATION_METRICS
            else "")
    if family == "evaluation":
        head, _, class_name = rest.partition(".")
        if not class_name and head in EVALUATION_METRICS:
            return None
        if class_name and head in PER_CLASS_METRICS:
            names = known_class_names(config) if config is not None else None
            if names is None or class_name in names or (
                    class_name.isdigit() and int(class_name) < len(names)):
                return None
            return (f"--expect: unknown metric {metric!r}: no class {class_name!r}; the "
                    f"classes are {', '.join(names)} (or their indices 0..{len(names) - 1})")
        return (f"--expect: unknown metric {metric!r}; evaluation has "
                f"{', '.join('evaluation.' + name for name in EVALUATION_METRICS)}, and "
                f"evaluation.{{{','.join(PER_CLASS_METRICS)}}}.<class>")
    if family in ("sanity", "faithfulness", "shortcut"):
        if command not in ("run", family):
            return (f"--expect {metric!r}: {family} results are computed by `cnnviz run`, "
                    f"not by `cnnviz {command}`")
        if family == "shortcut" and config is not None and not (
                config.data.source == "shapes" and config.data.shapes.spurious):
            return (f"--expect {metric!r}: the shortcut report runs only on data with a "
                    "spurious cue (data.source shapes with data.shapes.spurious set)")
        return _trust_name_problem(metric, family, rest, METHODS)
    return (f"--expect: unknown metric {metric!r}; names are metrics.json keys (test_accuracy, "
            "...) or start with evaluation., sanity., faithfulness., shortcut. or explain.")


def _explain_name_problem(metric: str, rest: str, config) -> str | None:
    from cnnviz.config.root import explain_metrics
    from cnnviz.config.train import EXPLAIN_METRICS

    if config is not None and config.train.explain is None:
        return (f"--expect {metric!r}: explain.* metrics need the train.explain section "
                "(e.g. --set train.explain={})")
    methods = config.train.explain.methods if config is not None else None
    metrics = explain_metrics(config) if config is not None else EXPLAIN_METRICS
    method, _, name = rest.rpartition(".")
    if (methods is None or method in methods) and name in metrics:
        return None
    return (f"--expect: unknown metric {metric!r}; explain metrics are explain.<method>."
            f"{{{','.join(metrics)}}}"
            + (f" with <method> one of {', '.join(methods)}" if methods else ""))


def explain_values(history: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Gate values from explain_history.csv's columns ({"gradcam.cue_share": [per epoch]}):
    the last epoch's under explain.<column>, and max(...) / min(...) over the epochs."""
    values: dict[str, float] = {}
    for column, series in history.items():
        if "." not in column or not len(series):
            continue
        name = f"explain.{column}"
        values[name] = float(series[-1])
        values[f"max({name})"] = float(max(series))
        values[f"min({name})"] = float(min(series))
    return values


def _trust_name_problem(metric: str, family: str, rest: str, methods: Sequence[str]) -> str | None:
    if family == "shortcut" and rest in SHORTCUT_METRICS:
        return None
    method, _, name = rest.partition(".")
    per_method = {"sanity": SANITY_METRICS, "faithfulness": FAITHFULNESS_METRICS,
                  "shortcut": SHORTCUT_METHOD_METRICS}[family]
    allowed_methods = (*methods, "random") if family == "faithfulness" else tuple(methods)
    if method in allowed_methods and name in per_method:
        return None
    extra = f"{family}.{{{','.join(SHORTCUT_METRICS)}}} or " if family == "shortcut" else ""
    return (f"--expect: unknown metric {metric!r}; {family} metrics are {extra}"
            f"{family}.<method>.{{{','.join(per_method)}}} with <method> one of "
            f"{', '.join(allowed_methods)}")


def known_class_names(config) -> list[str] | None:
    """The class names a config's data will have, when they are known without loading it
    (None for an npz file: its names are checked once the run has evaluated)."""
    import os

    data = config.data
    if data.class_names:
        return list(data.class_names)
    if data.source in ("digits", "mnist"):
        return [str(digit) for digit in range(10)]
    if data.source in ("fashion_mnist", "cifar10"):
        from cnnviz.data import CIFAR10_CLASSES, FASHION_MNIST_CLASSES

        return list(FASHION_MNIST_CLASSES if data.source == "fashion_mnist" else CIFAR10_CLASSES)
    if data.source == "shapes":
        return list(data.shapes.classes)
    if data.source == "inline" and data.labels:
        return [str(index) for index in range(max(data.labels) + 1)]
    if data.source == "directory" and data.path and os.path.isdir(data.path):
        # Keras's convention: the sorted names of the class sub-folders.
        return sorted(entry.name for entry in os.scandir(data.path)
                      if entry.is_dir() and not entry.name.startswith("."))
    return None


def _training_metrics(config) -> tuple[str, ...]:
    extra = () if config is None else tuple(
        f"test_{name}" for name in config.train.metrics if name != "accuracy")
    return TRAINING_METRICS + extra


# --------------------------------------------------------------------------------- values
def training_values(metrics: Mapping) -> dict[str, float]:
    """The numeric entries of metrics.json."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def evaluation_values(evaluation: Mapping) -> dict[str, float]:
    """evaluation.json's numbers under their gate names; per-class ones by name and by index."""
    values = {f"evaluation.{name}": _float(evaluation[name])
              for name in EVALUATION_METRICS if name in evaluation}
    for index, (class_name, entry) in enumerate(evaluation.get("per_class", {}).items()):
        for name in PER_CLASS_METRICS:
            values[f"evaluation.{name}.{class_name}"] = _float(entry[name])
            values.setdefault(f"evaluation.{name}.{index}", _float(entry[name]))
    return values


def _float(value) -> float:
    """JSON's null (a value that is undefined, e.g. the recall of an absent class) as NaN."""
    return math.nan if value is None else float(value)


def trust_values(sanity: Mapping | None = None, faithfulness: Mapping | None = None,
                 shortcut: Mapping | None = None) -> dict[str, float]:
    """Gate values from the trust reports' JSON (sanity.json, faithfulness.json, shortcut.json)."""
    values: dict[str, float] = {}
    if sanity:
        for method, entry in sanity["model_randomization"]["methods"].items():
            values[f"sanity.{method}.rank_correlation"] = float(entry["rank_correlation"][-1])
            values[f"sanity.{method}.ssim"] = float(entry["ssim"][-1])
        for method, entry in sanity.get("class_sensitivity", {}).get("methods", {}).items():
            values[f"sanity.{method}.class_correlation"] = float(entry["rank_correlation"])
    if faithfulness:
        for method, entry in faithfulness["methods"].items():
            for name in FAITHFULNESS_METRICS:
                values[f"faithfulness.{method}.{name}"] = float(entry[name])
    if shortcut:
        for name in ("train_accuracy", "test_accuracy"):
            values[f"shortcut.{name}"] = float(shortcut[name])
        for method, entry in shortcut["methods"].items():
            for name in SHORTCUT_METHOD_METRICS:
                values[f"shortcut.{method}.{name}"] = float(entry[name])
        values["shortcut.cue_reliance"] = max(
            float(entry["concentration"]) for entry in shortcut["methods"].values())
    return values


# ------------------------------------------------------------------------------- checking
@dataclass(frozen=True)
class Outcome:
    """An expectation with the value it met."""

    expectation: Expectation
    value: float
    passed: bool

    def to_dict(self) -> dict:
        return {"expectation": self.expectation.text, "metric": self.expectation.metric,
                "operator": self.expectation.operator, "threshold": self.expectation.threshold,
                "value": None if math.isnan(self.value) else self.value, "passed": self.passed}

    def check(self) -> Check:
        verdict = "holds" if self.passed else "FAILS"
        return Check("expectations", self.expectation.text, self.passed,
                     f"{self.expectation.metric} = {self.value:.6g}; expected "
                     f"{self.expectation.operator} {self.expectation.threshold:g}: {verdict}")


def check_expectations(expectations: Sequence[Expectation],
                       values: Mapping[str, float]) -> list[Outcome]:
    """Each expectation against `values`; CnnvizError for a metric the run did not produce."""
    missing = [expectation.metric for expectation in expectations
               if expectation.metric not in values]
    if missing:
        per_class = sorted({key.rsplit(".", 1)[0] + ".<class>" for key in values
                            if key.count(".") == 2 and key.startswith("evaluation.")})
        hint = (f" (classes: {', '.join(_class_names(values))})" if per_class else "")
        raise CnnvizError(f"--expect: this run has no metric {', '.join(map(repr, missing))}{hint}")
    return [Outcome(expectation, values[expectation.metric],
                    expectation.holds(values[expectation.metric])) for expectation in expectations]


def _class_names(values: Mapping[str, float]) -> list[str]:
    prefix = "evaluation.f1."
    return [key[len(prefix):] for key in values if key.startswith(prefix)]


def format_outcomes(outcomes: Sequence[Outcome]) -> str:
    """An aligned table: every expectation, its value and PASS/FAIL, with a verdict line."""
    if not outcomes:
        return ""
    rows = [(outcome.expectation.text, f"{outcome.value:.4g}", "PASS" if outcome.passed else "FAIL")
            for outcome in outcomes]
    header = ("expectation", "value", "result")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(3)]
    lines = ["  ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2]])
             for row in [header, *rows]]
    failed = sum(not outcome.passed for outcome in outcomes)
    verdict = (f"all {len(outcomes)} expectations hold" if not failed
               else f"{failed} of {len(outcomes)} expectations FAILED")
    return "\n".join([*lines, verdict])


# --------------------------------------------------------------------------- trust checks
def trust_checks(sanity: Mapping | None = None, faithfulness: Mapping | None = None,
                 shortcut: Mapping | None = None, *, seconds: Mapping[str, float] | None = None
                 ) -> list[Check]:
    """One Check per trust verdict in the reports' JSON: per method and test, and the shortcut.

    Each passes; a bad verdict is `flagged`, with the gate names that measure it as `metrics`
    (`report_checks` fails it when a failed expectation names one).
    """
    seconds = seconds or {}
    checks: list[Check] = []
    if sanity:
        randomization = sanity["model_randomization"]
        methods = randomization["methods"]
        classes = sanity.get("class_sensitivity", {})
        count = len(methods) + len(classes.get("methods", {}))
        share = seconds.get("sanity", 0.0) / max(1, count)  # the suite's time, spread evenly
        for method, entry in methods.items():
            final = entry["rank_correlation"][-1]
            # Per-step verdicts where the report has them: the layers whose randomization left
            # the map similar; else the verdict after the last step alone.
            unmoved = entry.get("insensitive_to", ["every layer"] if entry["insensitive"] else [])
            checks.append(_finding(
                "sanity", f"model randomization: {method}", bool(unmoved),
                f"rank correlation with the trained map after the last step {final:.3f} "
                f"(insensitive above {randomization['threshold']:g})"
                + (f"; insensitive to {', '.join(unmoved)}" if unmoved else ""), share,
                f"sanity.{method}.rank_correlation", f"sanity.{method}.ssim"))
        for method, entry in classes.get("methods", {}).items():
            checks.append(_finding(
                "sanity", f"class sensitivity: {method}", bool(entry["class_insensitive"]),
                "rank correlation of the top-1 and top-2 class maps "
                f"{entry['rank_correlation']:.3f}"
                f" (class-insensitive above {classes['threshold']:g})", share,
                f"sanity.{method}.class_correlation"))
    if faithfulness:
        methods = faithfulness["methods"]
        reference = methods.get("random")
        share = seconds.get("faithfulness", 0.0) / max(1, len(methods) - 1)
        for method, entry in methods.items():
            if method == "random":
                continue
            worse = entry.get("no_better_than_random", [])
            against = (f" (random: {reference['deletion_auc']:.3f}, "
                       f"{reference['insertion_auc']:.3f})" if reference else "")
            checks.append(_finding(
                "faithfulness", f"better than random: {method}", bool(worse),
                f"deletion AUC {entry['deletion_auc']:.3f}, insertion AUC "
                f"{entry['insertion_auc']:.3f}{against}"
                + (f"; no better than random on {' and '.join(worse)}" if worse else ""), share,
                *(f"faithfulness.{method}.{name}" for name in FAITHFULNESS_METRICS)))
    if shortcut:
        checks.append(_finding(
            "shortcut", "does not rely on the spurious cue", bool(shortcut["relies_on_cue"]),
            shortcut["verdict"], seconds.get("shortcut", 0.0), "shortcut.cue_reliance",
            *(f"shortcut.{method}.{name}" for method in shortcut["methods"]
              for name in SHORTCUT_METHOD_METRICS)))
    return checks


def _finding(suite: str, name: str, flagged: bool, message: str, seconds: float,
             *metrics: str) -> Check:
    """A trust check: it passes (a finding is no failure until a gate names it), flagged or not."""
    return Check(suite, name, True, message, seconds, flagged=flagged, metrics=metrics)


def report_checks(outcomes: Sequence[Outcome], checks: Iterable[Check] = ()) -> list[Check]:
    """The checks of a CI report, in step with the exit code: the expectations first, then
    `checks` as they are, except that a flagged trust check fails when a failed expectation
    names one of its metrics (the finding that gate is about).

    So the report has no failure unless the command exits 1: a failed expectation (the
    expectation's own case and the finding it names) or a check that drives the exit code by
    itself (verify's layers).
    """
    report = [outcome.check() for outcome in outcomes]
    for check in checks:
        gates = [outcome.expectation.text for outcome in outcomes
                 if not outcome.passed and outcome.expectation.metric in check.metrics]
        if check.flagged and gates:
            check = replace(check, passed=False,
                            message=f"{check.message}; gated by --expect {', '.join(gates)}")
        report.append(check)
    return report


def verify_checks(report) -> list[Check]:
    """One Check per layer of a `cnnviz.trust.reference.VerifyReport`."""
    checks = []
    for row in report.rows:
        if row.reason:
            message = f"cannot be recomputed: {row.reason}"
        else:
            message = (f"max |numpy - keras| = {row.max_difference:.3e} "
                       f"(tolerance {report.tolerance:.0e})")
        checks.append(Check("verify", f"{row.name} ({row.class_name})", bool(row.ok), message))
    return checks
