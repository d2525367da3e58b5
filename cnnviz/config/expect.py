"""`--expect` / `expect:` gates as written: `name OP number`, parsed and checked for syntax (names
are checked by cnnviz.ci.gates)."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cnnviz.errors import CnnvizError

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
             "==": operator.eq, "!=": operator.ne}
_OVER_EPOCHS = re.compile(r"^(?P<reduce>max|min)\((?P<metric>[^()]+)\)$")
_EXPECTATION = re.compile(
    r"^\s*(?P<metric>[^<>=!]+?)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>\S+)\s*$")


@dataclass(frozen=True)
class Expectation:
    """`metric operator threshold`, e.g. test_accuracy >= 0.95."""

    metric: str
    operator: str
    threshold: float

    @property
    def text(self) -> str:
        return f"{self.metric}{self.operator}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        """False for NaN: a metric that could not be computed never passes a gate."""
        return not math.isnan(value) and bool(OPERATORS[self.operator](value, self.threshold))


def over_epochs(metric: str) -> tuple[str | None, str]:
    """`max(explain.gradcam.cue_share)` -> ("max", "explain.gradcam.cue_share"); a plain name
    -> (None, name). max/min gate the largest or smallest value over the epochs."""
    match = _OVER_EPOCHS.match(metric.replace(" ", ""))
    return (match["reduce"], match["metric"]) if match else (None, metric)


def parse_expectation(text: str, *, source: str | None = "--expect") -> Expectation:
    """`"test_accuracy>=0.95"` -> Expectation; CnnvizError naming the text when malformed.

    Args:
        text: the expectation.
        source: where it was given, to start the error message with ("--expect"); None for a
            message without it (the config's validation adds the key path and the value).
    """
    prefix = f"{source} {text!r}: " if source else ""
    match = _EXPECTATION.match(str(text))
    if match is None:
        raise CnnvizError(
            f"{prefix}expected METRIC OP NUMBER with OP one of {', '.join(OPERATORS)} "
            "(e.g. test_accuracy>=0.95)")
    try:
        threshold = float(match["value"])
    except ValueError:
        raise CnnvizError(f"{prefix}{match['value']!r} is not a number") from None
    if math.isnan(threshold):
        raise CnnvizError(f"{prefix}the threshold must be a number, not NaN")
    reduce, metric = over_epochs(match["metric"])
    return Expectation(f"{reduce}({metric})" if reduce else metric, match["op"], threshold)


def parse_expectations(
    cli: Sequence[str] | None, config_expect: Sequence[str] = ()
) -> list[Expectation]:
    """The config's `expect:` list followed by `--expect` options, duplicates removed."""
    parsed = [parse_expectation(text, source="expect") for text in config_expect]
    parsed += [parse_expectation(text) for text in cli or ()]
    return list(dict.fromkeys(parsed))
