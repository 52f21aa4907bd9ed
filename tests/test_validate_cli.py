"""`moe-export validate` end to end on a tiny export: pass, a corrupted export, reports, bad input."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.ops.names import DOMAIN, ROUTED_OP_TYPES
from tests.artifacts import shared_export

CORRUPTED_UNIT = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    return shared_export(tmp_path_factory, tiny_base)


@pytest.fixture(scope="module")
def corrupted_dir(tmp_path_factory: pytest.TempPathFactory, export_dir: Path) -> Path:
    """A copy of the export with one weight of one routed node's B initializer changed."""
    out = tmp_path_factory.mktemp("corrupted") / "onnx"
    shutil.copytree(export_dir, out)
    model = onnx.load(str(out / "model.onnx"))
    node = next(n for n in model.graph.node if n.domain == DOMAIN and n.name == CORRUPTED_UNIT)
    b_input = node.input[3 if node.op_type in ROUTED_OP_TYPES else 4]  # B [E, D_out, R] (docs/op-contract.md)
    init = next(i for i in model.graph.initializer if i.name == b_input)
    b = numpy_helper.to_array(init).copy()
    b[0, 0, 0] += 5.0 * (np.abs(b).max() + 1.0)
    init.CopyFrom(numpy_helper.from_array(b, init.name))
    (out / "model.onnx").unlink()
    onnx.save_model(model, str(out / "model.onnx"))  # weights inline: the copy's own file
    return out


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_validate_passes(export_dir: Path, tmp_path: Path) -> None:
    report, junit = tmp_path / "r" / "report.json", tmp_path / "junit.xml"
    result = invoke("validate", export_dir, "--report", report, "--junit", junit)
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output
    data = json.loads(report.read_text())
    assert data["passed"] and data["failures"] == []
    assert [c["shape"] for c in data["comparisons"]] == ["1x7", "3x33"]
    logits = data["comparisons"][1]["outputs"]["logits"]
    assert logits["candidate_shape"] == [3, 33, 64] and logits["nan_count"] == 0
    assert logits["max_rel"] < 1e-4 and logits["top1_agreement"] == 1.0
    units = data["units"]["onnxruntime"]
    assert len(units) == 14  # 2 layers x 7 projections, every one routed
    assert all(u["agreement"] == 1.0 and u["op_max_abs"] < 1e-4 for u in units.values())
    root = ET.parse(junit).getroot()
    suites = root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    # 2 shapes x logits, 14 units, 2 generation prompt batches (the shared export is a KV-cache decoder)
    assert suite.get("tests") == str(2 + 14 + 2) and suite.get("failures") == "0"
    assert len(suite.findall("testcase")) == 18 and not suite.findall("testcase/failure")


def test_validate_json_and_single_shape(export_dir: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(export_dir), "--batch", "2", "--seq", "5", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["shapes"] == ["2x5"] and data["passed"]


def test_validate_npz_inputs(export_dir: Path, tmp_path: Path) -> None:
    ids = np.random.default_rng(1).integers(0, 64, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding is part of the contract
    np.savez(tmp_path / "in.npz", input_ids=ids, attention_mask=mask)
    result = invoke("validate", export_dir, "--inputs", tmp_path / "in.npz", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shapes"] == ["2x9"]


def test_corrupted_export_fails_and_names_output_and_unit(corrupted_dir: Path, tmp_path: Path) -> None:
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    result = invoke("validate", corrupted_dir, "--report", report, "--junit", junit)
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "logits" in result.output and CORRUPTED_UNIT in result.output
    data = json.loads(report.read_text())
    assert not data["passed"]
    assert any("logits" in line for line in data["failures"])
    failing_units = [n for n, u in data["units"]["onnxruntime"].items() if not u["passed"]]
    # The op check recomputes each node from its own inputs, so drift downstream does not blame other units.
    assert failing_units == [CORRUPTED_UNIT]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    failed = [c for c in suite.findall("testcase") if c.find("failure") is not None]
    assert suite.get("failures") == str(len(failed))
    names = {c.get("name") for c in failed}
    # 99 tokens (3x33) surely route through the changed expert; 7 tokens (1x7) may all miss it.
    assert CORRUPTED_UNIT in names and "logits[3x33]" in names
    assert all(c.find("failure").get("message") for c in failed)  # type: ignore[union-attr]


def test_loose_output_tolerance_still_flags_the_unit(corrupted_dir: Path) -> None:
    """--rtol 10 lets the logits pass; the unit checks keep the dtype's tolerance and still fail the unit."""
    result = invoke("validate", corrupted_dir, "--rtol", "10", "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert all(c["passed"] for c in data["comparisons"])
    assert [n for n, u in data["units"]["onnxruntime"].items() if not u["passed"]] == [CORRUPTED_UNIT]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda tmp, _src: tmp / "missing", "not found"),
        (lambda tmp, _src: tmp, "export.json"),
        (lambda tmp, src: _copy_with(tmp, src, "export.json", b"{not json"), "JSON"),
        (lambda tmp, src: _copy_with(tmp, src, "model.onnx", b"\x00garbage"), "model.onnx"),
    ],
    ids=["missing-dir", "no-manifest", "bad-manifest", "broken-model"],
)
def test_bad_input_exits_2(export_dir: Path, tmp_path: Path, make: object, needle: str) -> None:
    target = make(tmp_path, export_dir)  # type: ignore[operator]
    result = invoke("validate", target)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def _copy_with(tmp: Path, src: Path, name: str, content: bytes) -> Path:
    out = tmp / "copy"
    shutil.copytree(src, out)
    (out / name).write_bytes(content)
    return out


@pytest.mark.parametrize(
    "args",
    [
        ["--runtimes", "torch"],
        ["--runtimes", "torch,nosuchruntime"],
        ["--inputs", "x.npz", "--batch", "2"],
    ],
)
def test_bad_options_exit_2(export_dir: Path, args: list[str]) -> None:
    result = invoke("validate", export_dir, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_saved_results_give_the_same_verdict_in_another_process(export_dir: Path, tmp_path: Path) -> None:
    """Run then compare: --save-results here, --load-results in a fresh interpreter, same verdict and numbers; a
    saved run that is then tampered with fails on load (the loaded outputs are what is judged)."""
    import subprocess
    import sys

    saved, first = tmp_path / "runs", tmp_path / "first.json"
    result = invoke("validate", export_dir, "--save-results", saved, "--report", first, "--new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert (saved / "onnxruntime" / "result.json").is_file()
    again = invoke("validate", export_dir, "--save-results", saved)
    assert again.exit_code == 2 and "already exists" in again.output  # never overwrites

    def load(directory: Path, report: Path) -> tuple[int, dict]:
        cmd = [
            sys.executable,
            "-c",
            "from moe_export.cli import main; main()",
            "validate",
            str(export_dir),
            "--load-results",
            str(directory),
        ]
        done = subprocess.run([*cmd, "--report", str(report)], capture_output=True, text=True, timeout=600)
        assert report.is_file(), done.stdout + done.stderr
        return done.returncode, json.loads(report.read_text())

    code, second = load(saved, tmp_path / "second.json")
    data = json.loads(first.read_text())
    assert code == 0 and second["passed"] == data["passed"] is True
    for a, b in zip(data["comparisons"], second["comparisons"], strict=True):
        assert a["outputs"]["logits"]["max_abs"] == b["outputs"]["logits"]["max_abs"]
        assert a["flip_count"] == b["flip_count"]
    assert second["units"].keys() == data["units"].keys() and len(second["generation"]) == len(data["generation"])

    npz = saved / "onnxruntime" / "input_1.npz"
    arrays = dict(np.load(npz))
    arrays["out|logits"] = arrays["out|logits"] + 1.0
    np.savez(npz, **arrays)
    code, tampered = load(saved, tmp_path / "third.json")
    assert code == 1 and not tampered["passed"]


def test_an_already_built_reference_is_judged_with_route_replay(export_dir: Path) -> None:
    """`reference_runner` stands in for the torch reference (how an int4 export is judged against its dequantized
    base): the same model passes, the same model with one base weight substituted fails."""
    import torch

    import moe_export
    from moe_export.export.manifest import Artifact
    from moe_export.runtimes.torch_runner import TorchRunner, reference_model_loader

    model = reference_model_loader(Artifact.open(export_dir), "fp32")()
    report = moe_export.validate(
        export_dir,
        new_tokens=0,
        reference_runner=TorchRunner(lambda: model, interface=Artifact.open(export_dir).interface),
    )
    assert report.passed and report.units["onnxruntime"], report.failures()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.01)  # a substituted base weight
    report = moe_export.validate(
        export_dir,
        new_tokens=0,
        reference_runner=TorchRunner(lambda: model, interface=Artifact.open(export_dir).interface),
    )
    assert not report.passed and "logits" in " ".join(report.failures())
