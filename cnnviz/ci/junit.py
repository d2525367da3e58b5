"""JUnit XML reports of `Check`s, the format GitHub Actions, GitLab and Jenkins show as tests.

Follows the schema Jenkins validates against (junit-10.xsd, also what GitLab reads): a
`<testsuites>` root; one `<testsuite>` per check group with `name`, `tests`, `failures`,
`errors`, `skipped`, `time`, `timestamp`, `hostname` and `id`, then `<properties>`, its
`<testcase name classname time>` elements, `<system-out>` and `<system-err>`. A failed check is a
`<failure message type>`; a passed one carries its measured value in `<system-out>`.

The report follows the exit code: its checks come from `cnnviz.ci.gates.report_checks`, where a
flagged trust check (a finding no failed `--expect` names) passes. A trust check records its
verdict in the test case's own `<properties>` (the form pytest's `record_property` writes; a
reader that does not know it skips it): `flagged` (true/false), `metrics` (the gate names that
measure it) and, when flagged, `finding` (the message); a flagged one that passes says so in its
`<system-out>` too, which every reader shows.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.etree import ElementTree

from cnnviz.ci.gates import Check
from cnnviz.io.atomic import atomic_write_bytes

FAILURE_TYPES = {"expectations": "ExpectationFailed"}


def junit_xml(checks: Sequence[Check], *, name: str = "cnnviz",
              properties: Mapping[str, str] | None = None, timestamp: float | None = None) -> bytes:
    """The checks as a JUnit XML document (UTF-8 bytes), one test suite per `Check.suite`.

    Args:
        checks: the pass/fail lines, in report order.
        name: the report's name (the `<testsuites>` name and each suite's prefix).
        properties: name -> value pairs recorded in every suite (config, run directory, ...).
        timestamp: seconds since the epoch (default: now), written in local ISO 8601 form.
    """
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(timestamp))
    host = socket.gethostname() or "localhost"
    suites: dict[str, list[Check]] = {}
    for check in checks:
        suites.setdefault(check.suite, []).append(check)
    root = ElementTree.Element("testsuites", name=name)
    for index, (suite, members) in enumerate(suites.items()):
        element = ElementTree.SubElement(root, "testsuite", {
            "name": f"{name}.{suite}", "id": str(index), "tests": str(len(members)),
            "failures": str(sum(not check.passed for check in members)), "errors": "0",
            "skipped": "0", "time": _seconds(sum(check.seconds for check in members)),
            "timestamp": stamp, "hostname": host,
        })
        listed = ElementTree.SubElement(element, "properties")
        for key, value in (properties or {}).items():
            ElementTree.SubElement(listed, "property", name=str(key), value=str(value))
        for check in members:
            case = ElementTree.SubElement(element, "testcase", name=check.name,
                                          classname=f"{name}.{suite}", time=_seconds(check.seconds))
            if check.metrics:
                _case_properties(case, check)
            if check.passed:
                ElementTree.SubElement(case, "system-out").text = (
                    f"flagged (a finding, not a failure: an --expect on one of {_names(check)} "
                    f"makes it one): {check.message}" if check.flagged else check.message)
            else:
                failure = ElementTree.SubElement(
                    case, "failure", message=check.message,
                    type=FAILURE_TYPES.get(suite, "TrustCheckFlagged"))
                failure.text = check.message
        ElementTree.SubElement(element, "system-out")
        ElementTree.SubElement(element, "system-err")
    root.set("tests", str(len(checks)))
    root.set("failures", str(sum(not check.passed for check in checks)))
    root.set("errors", "0")
    root.set("skipped", "0")
    root.set("time", _seconds(sum(check.seconds for check in checks)))
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(path: str | Path, checks: Sequence[Check], **options) -> Path:
    """Write `junit_xml(checks, **options)` to `path` atomically."""
    return atomic_write_bytes(path, junit_xml(checks, **options))


def _case_properties(case: ElementTree.Element, check: Check) -> None:
    listed = ElementTree.SubElement(case, "properties")
    entries = {"flagged": "true" if check.flagged else "false", "metrics": _names(check)}
    if check.flagged:
        entries["finding"] = check.message
    for key, value in entries.items():
        ElementTree.SubElement(listed, "property", name=key, value=value)


def _names(check: Check) -> str:
    return ", ".join(check.metrics)


def _seconds(value: float) -> str:
    return f"{max(0.0, float(value)):.3f}"
