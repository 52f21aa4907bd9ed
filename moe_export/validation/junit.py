"""JUnit XML for CI (GitHub Actions test reporters, GitLab `artifacts:reports:junit`).

One <testsuite> inside <testsuites>; a <testcase> per (runtime, input, output), per (runtime, unit) and,
on a KV-cache export, per (runtime, generation prompt batch);
failures carry a one-line message and the detail as text.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_export.validation.report import ValidationReport

SUITE_NAME = "moe-export validate"


def junit_xml(report: ValidationReport) -> str:
    suite = ET.Element("testsuite", name=SUITE_NAME)
    cases: list[tuple[ET.Element, bool]] = []

    def add_case(classname: str, name: str, failures: list[str], seconds: float | None = None) -> None:
        case = ET.SubElement(suite, "testcase", classname=classname, name=name, time=f"{seconds or 0.0:.6f}")
        if failures:
            failure = ET.SubElement(case, "failure", message=failures[0][:500], type="ParityFailure")
            failure.text = "\n".join(failures)
        cases.append((case, bool(failures)))

    for c in report.comparisons:
        classname = f"parity.{c.runtime}"
        for out in c.result.outputs.values():
            add_case(classname, f"{out.name}[{c.shape}]", out.messages, c.seconds)
        if c.result.messages:
            add_case(classname, f"outputs[{c.shape}]", c.result.messages, c.seconds)
    for runtime, per_unit in report.units.items():
        for unit in per_unit.values():
            add_case(f"units.{runtime}", unit.name, unit.messages)
    for g in report.generation:
        add_case(f"generation.{g.runtime}", g.label, [g.message] if not g.passed else [])
    if not cases:
        add_case("parity", "validation", ["no comparison ran"])
    failures = sum(failed for _, failed in cases)
    total_time = sum(c.seconds or 0.0 for c in report.comparisons)
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    suite.set("time", f"{total_time:.6f}")
    props = ET.Element("properties")
    for key, value in (("artifact", report.artifact), ("dtype", report.dtype), ("reference", report.reference)):
        ET.SubElement(props, "property", name=key, value=str(value))
    suite.insert(0, props)
    root = ET.Element("testsuites", name=SUITE_NAME, tests=str(len(cases)), failures=str(failures), errors="0")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
