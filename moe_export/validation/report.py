"""The validation report: verdict, per-output and per-unit statistics, rendered as a rich table or JSON."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from moe_export.errors import ParityError
from moe_export.export.onnx_graph import unit_of_node
from moe_export.files import write_text_atomic
from moe_export.ir import short_unit_name
from moe_export.validation.parity import CompareResult, Tolerance
from moe_export.validation.units import Flip, UnitComparison

MAX_UNIT_ROWS = 20
FLIP_RULE = (
    "a routing flip passes iff its reference margin <= bound, the bound being how far the router probabilities can "
    "move between the reference's and the candidate's router input plus the router's rounding in the export dtype"
)


@dataclass
class RunComparison:
    """One candidate runtime against the reference on one input."""

    runtime: str
    shape: str
    result: CompareResult
    seconds: float | None = None  # the candidate's inference time for this input
    replayed: bool = False  # the reference ran with the candidate's routing decisions (route replay)
    flip_count: int = 0  # token-units where the candidate chose other experts than the replayed reference
    flips: list[Flip] = field(default_factory=list)  # listed ones (units.MAX_LISTED_FLIPS per unit)

    @property
    def largest_flip(self) -> Flip | None:
        return max(self.flips, key=lambda f: f.margin / f.bound if f.bound > 0 else float("inf"), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "shape": self.shape,
            "seconds": self.seconds,
            "route_replay": self.replayed,
            "flip_count": self.flip_count,
            "flips": [asdict(f) | {"near_tie": f.near_tie} for f in self.flips],
            **self.result.to_dict(),
        }


@dataclass
class ValidationReport:
    """Everything `moe-export validate` decides and shows; truthy when it passed."""

    artifact: str
    dtype: str
    reference: str
    runtimes: list[str]
    tolerance: Tolerance
    shapes: list[str]
    comparisons: list[RunComparison] = field(default_factory=list)
    units: dict[str, dict[str, UnitComparison]] = field(default_factory=dict)  # runtime -> unit -> stats
    notes: list[str] = field(default_factory=list)
    generation: list[Any] = field(default_factory=list)  # generation.GenerationComparison, decoder exports
    torch_dtype: str | None = None  # the dtype the torch runner computed in (fp32 for the reference)
    quantization: Any | None = None  # quantized.QuantizationCost of a quantized export

    @property
    def passed(self) -> bool:
        if not self.comparisons:
            return False  # an empty validation proves nothing
        outputs_ok = all(c.result.passed for c in self.comparisons)
        units_ok = all(u.passed for per_runtime in self.units.values() for u in per_runtime.values())
        generation_ok = all(g.passed for g in self.generation)
        quantization_ok = self.quantization is None or self.quantization.passed
        return outputs_ok and units_ok and generation_ok and quantization_ok

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> list[str]:
        """One line per failing output and per failing unit, naming the runtime and input."""
        lines = [] if self.comparisons else ["no comparison ran"]
        for c in self.comparisons:
            lines += [f"{c.runtime} [{c.shape}] {line}" for line in c.result.failures()]
        for runtime, per_unit in self.units.items():
            for unit in per_unit.values():
                lines += [f"{runtime} unit {unit.name}: {message}" for message in unit.messages]
        lines += [f"{g.runtime} generation {g.message}" for g in self.generation if not g.passed]
        if self.quantization is not None and not self.quantization.passed:
            lines.append(f"quantization cost over the gate: {self.quantization.message}")
        return lines

    def summary(self) -> str:
        """One line: what passed, or which outputs and units diverged."""
        if self.passed:
            return f"parity passed: {', '.join(self.runtimes)} vs {self.reference} on {', '.join(self.shapes)}"
        bad = [f"{c.runtime} {name}[{c.shape}]" for c in self.comparisons for name, out in c.result.outputs.items()
               if not out.passed]  # fmt: skip
        bad += [f"{c.runtime} [{c.shape}]" for c in self.comparisons if c.result.messages]
        bad += [f"{rt} unit {u.name}" for rt, units in self.units.items() for u in units.values() if not u.passed]
        bad += [f"{g.runtime} generation {g.message}" for g in self.generation if not g.passed]
        if self.quantization is not None and not self.quantization.passed:
            bad.append(f"quantization top-1 drop {self.quantization.top1_drop:.1%}")
        shown = ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
        return f"parity failed vs {self.reference}: {shown or 'no comparison ran'}"

    def check(self) -> None:
        """Raise ParityError (exit 1) when parity failed; its message names what diverged."""
        if not self.passed:
            raise ParityError(self.summary(), self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "artifact": self.artifact,
            "dtype": self.dtype,
            "reference": self.reference,
            "runtimes": self.runtimes,
            "tolerance": asdict(self.tolerance),
            "tolerance_definition": "pass iff max|candidate - reference| <= atol + rtol * max|reference| per output",
            "flip_rule": FLIP_RULE,
            "shapes": self.shapes,
            "failures": self.failures(),
            "comparisons": [c.to_dict() for c in self.comparisons],
            "units": {rt: {name: u.to_dict() for name, u in units.items()} for rt, units in self.units.items()},
            "notes": self.notes,
            "generation": [g.to_dict() for g in self.generation],
            "quantization": self.quantization.to_dict() if self.quantization is not None else None,
        }

    def write_json(self, path: str | Path) -> Path:
        return write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def write_junit(self, path: str | Path) -> Path:
        return write_text_atomic(Path(path), junit_xml(self))

    def render(self, console: Console) -> None:
        console.print(self._outputs_table())
        for runtime, per_unit in self.units.items():
            console.print(_units_summary(runtime, self.reference, per_unit))
            table = _units_table(runtime, per_unit)
            if table is not None:
                console.print(table)
        for g in self.generation:
            verdict = "[green]pass[/]" if g.passed else f"[red]FAIL[/] {g.message}"
            ties = f", {len(g.near_ties)} near-tie(s): {'; '.join(g.near_ties)}" if g.near_ties else ""
            console.print(
                f"generation ({g.runtime} vs {self.reference}, greedy {g.new_tokens} tokens, {g.label}): "
                f"logits max abs {g.max_abs:.3g} <= {g.bound:.3g}{ties}; {verdict}",
                highlight=False,
            )
        if self.quantization is not None:
            verdict = (
                ""
                if self.quantization.max_top1_drop is None
                else ("; [green]pass[/]" if self.quantization.passed else "; [red]FAIL[/]")
            )
            console.print(f"quantization cost: {self.quantization.message}{verdict}", highlight=False)
        for note in self.notes:
            console.print(f"[dim]note: {note}[/]")
        if self.passed:
            console.print(f"[bold green]PASSED[/] {self.summary()}", highlight=False)
            return
        console.print("[bold red]Failures:[/]")
        for line in self.failures():
            console.print(f"  - {line}", highlight=False)

    def _reference_label(self) -> str:
        torch_dtype = f" {self.torch_dtype}" if self.reference == "torch" and self.torch_dtype else ""
        return f"{self.reference}{torch_dtype}"

    def _outputs_table(self) -> Table:
        tol = self.tolerance
        table = Table(
            caption="replayed: the reference ran with the candidate's routing decisions; flips are judged apart "
            "(margin <= bound: a near-tie); max rel = max abs / max|ref|",
            title=f"Parity of the {self.dtype} export vs {self._reference_label()} (pass: max abs <= {tol.atol:g} + {tol.rtol:g} x max|ref|)",
        )
        for column in ("runtime", "input", "output", "max abs", "bound", "max rel", "NaN/Inf", "top-1", "flips"):
            table.add_column(column, justify="left" if column in ("runtime", "input", "output") else "right")
        table.add_column("largest flip margin / bound", justify="right")
        table.add_column("result")
        for c in self.comparisons:
            largest = c.largest_flip
            flip_text = "" if largest is None else f"{largest.margin:.3g} / {largest.bound:.3g}"
            flips = f"{c.flip_count}" if c.replayed else "not replayed"
            for out in c.result.outputs.values():
                top1 = "" if out.top1_agreement is None else f"{out.top1_agreement:.4f}"
                verdict = "[green]pass[/]" if out.passed else "[red]FAIL[/]"
                row = [_fmt(out.max_abs), _fmt(out.bound), _fmt(out.max_rel), f"{out.nan_count}/{out.inf_count}", top1]
                table.add_row(c.runtime, c.shape, out.name, *row, flips, flip_text, verdict)
            for _ in c.result.messages:
                table.add_row(c.runtime, c.shape, "-", *[""] * 7, "[red]FAIL[/]")
        return table


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _units_summary(runtime: str, reference: str, per_unit: dict[str, UnitComparison]) -> str:
    if not per_unit:
        return f"routing ({runtime} vs {reference}, replayed): no routed units captured"
    failed = sum(not u.passed for u in per_unit.values())
    flips = sum(u.flip_count for u in per_unit.values())
    same = sum(u.router_flip_count for u in per_unit.values())
    # Counted as `onnx` counts them: a MixLoRA unit has a node per projection (captured as unit, unit#2, unit#3).
    units = len({unit_of_node(name) for name in per_unit})
    text = f"routing ({runtime} vs {reference}, replayed): {units} units, {flips} flipped token-units"
    text += f", {same} on the same input"
    largest = max((f for u in per_unit.values() if (f := u.largest_flip)), key=_ratio, default=None)
    if largest is not None:
        text += f"; largest flip margin {largest.margin:.3g} vs bound {largest.bound:.3g} ({largest.unit})"
    op_checked = [u for u in per_unit.values() if u.op_max_abs is not None and u.op_bound is not None]
    if op_checked:
        # The op bound scales with each unit's output magnitude: show the error beside its bound (the unit
        # closest to failing), never a bare number that reads as large while it passes.
        worst = max(op_checked, key=lambda u: u.op_max_abs / u.op_bound if u.op_bound else float("inf"))
        relation = "<=" if worst.op_max_abs <= worst.op_bound else ">"
        text += f"; op check max abs {worst.op_max_abs:.3g} {relation} bound {worst.op_bound:.3g} (closest unit)"
    return text + (f"; [red]{failed} unit(s) FAIL[/]" if failed else "; [green]all units pass[/]")


def _ratio(flip: Flip) -> float:
    return flip.margin / flip.bound if flip.bound > 0 else float("inf")


def _units_table(runtime: str, per_unit: dict[str, UnitComparison]) -> Table | None:
    """Every listed flip (failing first, then by margin / bound), at most MAX_UNIT_ROWS rows; None when none."""
    flips = sorted((f for u in per_unit.values() for f in u.flips + u.router_flips), key=_ratio, reverse=True)
    failing = [u for u in per_unit.values() if not u.passed]
    if not flips and not failing:
        return None
    table = Table(title=f"Routing flips and failing units ({runtime}); the JSON report lists every flip")
    for column in ("unit", "input", "row", "pos", "check", "margin", "bound", "result"):
        table.add_column(column, justify="left" if column in ("unit", "input", "check", "result") else "right")
    for f in flips[:MAX_UNIT_ROWS]:
        verdict = "[green]near-tie[/]" if f.near_tie else "[red]FAIL[/]"
        check = "same input" if f.same_input else "replayed"
        row = [str(f.row), str(f.position), check, f"{f.margin:.3g}", f"{f.bound:.3g}", verdict]
        table.add_row(short_unit_name(f.unit), f.input, *row)
    if len(flips) > MAX_UNIT_ROWS:
        table.add_row(f"... {len(flips) - MAX_UNIT_ROWS} more", *[""] * 7)
    for u in failing:
        if not any(not f.near_tie for f in u.flips + u.router_flips):
            table.add_row(
                short_unit_name(u.name), "", "", "", "op/gates", _fmt(u.op_max_abs), _fmt(u.op_bound), "[red]FAIL[/]"
            )
    return table


# JUnit XML for CI (GitHub Actions test reporters, GitLab `artifacts:reports:junit`): one <testsuite>, a
# <testcase> per (runtime, input, output), per (runtime, unit) and, on a KV-cache export, per (runtime, generation
# prompt batch); failures carry a one-line message.
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
