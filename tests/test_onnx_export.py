"""`export_onnx` / `moe-export onnx` end to end on tiny models: graph structure, ORT parity, manifest, atomicity.

Exports are slow (torch.export), so each export the tests share is made once per run (tests/artifacts.py)
and many tests read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import moe_export
from moe_export import api
from moe_export.cli import app
from moe_export.errors import ExportError, ParityError
from moe_export.export import onnx as onnx_export
from moe_export.export.manifest import MANIFEST_NAME, Artifact, ExportManifest
from moe_export.export.onnx_graph import LINEAR_UNIT_OP_TYPES
from moe_export.ir import Adapter
from moe_export.ops.names import DOMAIN, PLUGIN_ATTRIBUTES
from moe_export.reference.loading import load_base_model
from moe_export.reference.model import cast_reference_model
from moe_export.validation.generation import default_prompts
from tests.artifacts import SAMPLE_TASK_IDS, export_result, merged_sample_run, sample_export, shared_dir
from tests.conftest import SAMPLES
from tests.genai_check import assert_genai_matches_torch
from tests.tiny import random_adapter

# Shapes other than the export example (2, 16), including batch 1 and sequence 1.
SHAPES = [(1, 1), (1, 7), (3, 33)]
FP32_RTOL = 1e-4  # relative to max |reference logit|


def mixed_adapter(base: Path) -> Adapter:
    """Layer 0: top-2 with shared LoRAs; layer 1: dense routing with one A shared by all experts."""
    topk = random_adapter(num_layers=1, top_k=2, with_shared=True, seed=1)
    dense = random_adapter(num_layers=2, top_k=None, shared_a=True, with_shared=True, seed=2)
    units = topk.units + [u for u in dense.units if u.name.startswith("model.layers.1.")]
    return Adapter(family="canonical", units=units, base_model=str(base))


def feeds_for(shape: tuple[int, int], vocab: int, seed: int = 0, pad: int = 0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)  # [B, S]
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, :pad] = 0  # left padding on the last row
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def ort_logits(model_path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """A first step (past length 0) of a decoder export, or the scoring graph's logits."""
    feeds = ExportManifest.load(model_path.parent).interface.complete_feeds(feeds)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def torch_logits(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        ids, mask = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def assert_parity(got: np.ndarray, want: np.ndarray, rtol: float, min_top1: float = 1.0) -> None:
    assert got.shape == want.shape and np.isfinite(got).all()
    err = float(np.abs(got.astype(np.float32) - want).max())
    assert err <= rtol * float(np.abs(want).max()), f"max abs error {err:.3g} vs max |logit| {np.abs(want).max():.3g}"
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    assert top1 >= min_top1, f"top-1 agreement {top1:.3f}"


RETURNED_MANIFEST = "returned-manifest.json"  # the manifest export_onnx returned, next to the export it wrote


@pytest.fixture(scope="module")
def mixed(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mixed adapter's checkpoint (ckpt/) and its default export (fp32/), made once per run."""

    def build(root: Path) -> None:
        ckpt = mixed_adapter(tiny_base).save(root / "ckpt")
        result = moe_export.export_onnx(moe_export.load(ckpt), root / "fp32", validate=False, progress=False)
        (root / RETURNED_MANIFEST).write_text(json.dumps(result.manifest.to_dict()))

    return shared_dir(tmp_path_factory, "mixed", build)


@pytest.fixture(scope="module")
def mixed_ckpt(mixed: Path) -> Path:
    return mixed / "ckpt"


@pytest.fixture(scope="module")
def fp32_export(mixed: Path) -> onnx_export.ExportResult:
    return export_result(mixed / "fp32")


@pytest.fixture(scope="module")
def reference(mixed_ckpt: Path) -> torch.nn.Module:
    """A fresh reference (shared LoRAs not folded): the export must match the unfolded math."""
    return moe_export.load(mixed_ckpt).model


def test_fp32_graph_structure(fp32_export: onnx_export.ExportResult, mixed_ckpt: Path) -> None:
    onnx.checker.check_model(str(fp32_export.model_path), full_check=True)
    model = onnx.load(str(fp32_export.model_path))
    units = sorted(u.name for u in Adapter.load(mixed_ckpt).units)
    custom = {n.name: n for n in model.graph.node if n.domain == DOMAIN}
    assert sorted(custom) == units
    # The adapter passes (on by default): layer 0's top-2 routers move into their nodes with the residual Add;
    # layer 1's dense routing keeps its standard ops, and only the residual Add joins its node.
    kinds = {name: ("RoutedGroupedLoRAAdd" if ".layers.0." in name else "GroupedLoRAAdd") for name in units}
    assert {name: n.op_type for name, n in custom.items()} == kinds
    for node in custom.values():
        attributes = {a.name: a.s.decode() if a.type == onnx.AttributeProto.STRING else a.i for a in node.attribute}
        router = {"k": 2, "normalize": 1} if node.op_type.startswith("Routed") else {}
        assert attributes == {**PLUGIN_ATTRIBUTES, **router}
    assert sorted((f.domain, f.name) for f in model.functions) == [(DOMAIN, t) for t in sorted(set(kinds.values()))]
    assert {o.domain: o.version for o in model.opset_import}[DOMAIN] == 1
    # views: the Reshapes to [T, D_in] before layer 0's routed nodes (q/k/v, o, gate/up and down read 4 distinct x)
    assert fp32_export.manifest.adapter_fusion == {"requested": True, "residual_adds": 14, "routers": 7, "views": 4}
    assert fp32_export.manifest.custom_ops == sorted(set(kinds.values()))
    # no router chain is left outside the nodes that took theirs in: one Softmax per dense unit of layer 1
    assert sum(n.op_type == "Softmax" and n.domain == "" for n in model.graph.node) == 7 + 2  # + attention
    assert not any(n.op_type == "TopK" for n in model.graph.node)
    # The default export is the KV-cache decoder (test_decoder.py checks its contract in full).
    names = [i.name for i in model.graph.input][:3], [o.name for o in model.graph.output][:2]
    assert names == (["input_ids", "attention_mask", "position_ids"], ["logits", "present.0.key"])
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input][:4]
    assert dims == [
        ["batch", "sequence"],
        ["batch", "total_sequence"],
        ["batch", "sequence"],
        ["batch", 2, "past_sequence", 8],
    ]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fp32_parity(fp32_export: onnx_export.ExportResult, reference: torch.nn.Module, shape: tuple[int, int]) -> None:
    feeds = feeds_for(shape, vocab=64, seed=shape[1])
    assert_parity(ort_logits(fp32_export.model_path, feeds), torch_logits(reference, feeds), FP32_RTOL)


def test_fp32_parity_left_padding(fp32_export: onnx_export.ExportResult, reference: torch.nn.Module) -> None:
    feeds = feeds_for((2, 9), vocab=64, seed=3, pad=3)
    got, want = ort_logits(fp32_export.model_path, feeds), torch_logits(reference, feeds)
    keep = feeds["attention_mask"].astype(bool)  # padded positions are never read
    assert_parity(got[keep], want[keep], FP32_RTOL)


def test_adapter_changes_the_logits(fp32_export: onnx_export.ExportResult, tiny_base: Path) -> None:
    """Guards the parity tests: an export that dropped the adapter would differ from the base model."""
    feeds = feeds_for((1, 7), vocab=64)
    diff = np.abs(ort_logits(fp32_export.model_path, feeds) - torch_logits(load_base_model(tiny_base), feeds)).max()
    assert diff > 1e-2


def test_manifest(fp32_export: onnx_export.ExportResult, mixed_ckpt: Path, tiny_base: Path) -> None:
    out = fp32_export.out_dir
    manifest = ExportManifest.load(out)
    returned = ExportManifest.from_dict(json.loads((out.parent / RETURNED_MANIFEST).read_text()))
    assert manifest == returned == ExportManifest.from_dict(manifest.to_dict())
    # Recorded relative to the export when they share a parent (issue 14); Artifact.open resolves them.
    resolved = Artifact.open(out).manifest
    assert resolved.source_checkpoint == str(mixed_ckpt.resolve()) and resolved.base_model == str(tiny_base.resolve())
    assert (manifest.family, manifest.dtype, manifest.opset, manifest.base_only) == ("canonical", "fp32", 20, False)
    assert manifest.load_options == {"top_k": None, "task_id": None} and manifest.merge_plan is None
    by_name = {u.name: u for u in manifest.units}
    assert len(by_name) == 14 and all(u.status == "routed" for u in manifest.units)
    assert (by_name["model.layers.0.mlp.up_proj"].top_k, by_name["model.layers.1.mlp.up_proj"].top_k) == (2, 4)
    assert {(u.num_experts, u.rank) for u in manifest.units} == {(4, 2)}
    assert [(t.name, t.dtype, t.shape) for t in manifest.outputs][:2] == [
        ("logits", "float32", ("batch", "sequence", 64)),
        ("present.0.key", "float32", ("batch", 2, "total_sequence", 8)),
    ]
    assert manifest.external_data is None and manifest.custom_ops == ["GroupedLoRAAdd", "RoutedGroupedLoRAAdd"]
    assert "config.json" in manifest.copied_files and (out / "config.json").is_file()
    assert not list(out.parent.glob(".*tmp-*")), "no temporary directory may remain"


def test_manifest_from_newer_version_warns(fp32_export: onnx_export.ExportResult) -> None:
    data = fp32_export.manifest.to_dict() | {"future_field": 1}
    with pytest.warns(UserWarning, match="future_field"):
        assert ExportManifest.from_dict(data) == fp32_export.manifest


def test_fp16_export(mixed_ckpt: Path, tmp_path: Path) -> None:
    loaded = moe_export.load(mixed_ckpt)
    result = moe_export.export_onnx(loaded, tmp_path / "fp16", dtype="fp16", validate=False, progress=False)
    onnx.checker.check_model(str(result.model_path), full_check=True)
    assert next(p.dtype for p in loaded.model.parameters()) == torch.float32, "the caller's model stays fp32"
    assert result.manifest.dtype == "fp16" and result.manifest.outputs[0].dtype == "float16"
    feeds = feeds_for((3, 33), vocab=64, seed=5)
    got = ort_logits(result.model_path, feeds)
    assert got.dtype == np.float16 and np.isfinite(got).all()
    want = torch_logits(cast_reference_model(moe_export.load(mixed_ckpt).model, torch.float16), feeds)
    # Looser than fp32, on purpose: fp16 rounding (ORT CPU runs most fp16 ops as fp32 kernels and rounds
    # between them, torch rounds elsewhere) can flip a near-tie top-k routing decision, and a flipped token
    # takes another expert pair; with this tiny random adapter that moves its logits by a few percent.
    # So: nearly every position within 1e-2 of the logit range, and the argmax kept on 90% of them.
    err = np.abs(got.astype(np.float32) - want).max(-1) / np.abs(want).max()  # [B, S]
    assert (err < 1e-2).mean() >= 0.9, f"positions within 1e-2: {(err < 1e-2).mean():.2f}"
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_cli_base_only(mixed_ckpt: Path, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "base-onnx"
    res = CliRunner().invoke(app, ["onnx", str(mixed_ckpt), "--base-only", "--no-validate", "--json", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["manifest"]["base_only"] is True and report["manifest"]["units"] == []
    model = onnx.load(str(out / "model.onnx"))
    assert not [n for n in model.graph.node if n.domain == DOMAIN] and not model.functions
    feeds = feeds_for((3, 33), vocab=64)
    assert_parity(ort_logits(out / "model.onnx", feeds), torch_logits(load_base_model(tiny_base), feeds), FP32_RTOL)


def test_failure_leaves_nothing(mixed_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after files were written (here: a broken export step) removes the temporary directory."""

    def broken_post_process(program: object, model: object, model_path: Path, *rest: object) -> None:
        model_path.write_bytes(b"partial")
        raise ExportError("simulated failure")

    monkeypatch.setattr(onnx_export, "post_process", broken_post_process)
    loaded = moe_export.load(mixed_ckpt)
    with pytest.raises(ExportError, match="simulated"):
        moe_export.export_onnx(loaded, tmp_path / "out", validate=False, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_export_is_kept_on_failure(mixed_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("{}")
    monkeypatch.setattr(onnx_export, "_trace", lambda *a: (_ for _ in ()).throw(ExportError("simulated")))
    with pytest.raises(ExportError):
        moe_export.export_onnx(moe_export.load(mixed_ckpt), out, validate=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / MANIFEST_NAME).read_text() == "{}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--merge-threshold", "0.9", "--merge-budget", "0.1"], "exclude"),
        (["--dtype", "int8"], "--dtype"),
        (["--opset", "12"], "--opset"),
        (["--data", "missing.txt"], "--data"),
    ],
    ids=["merge-both", "dtype", "opset", "data-without-merge"],
)
def test_cli_bad_options_exit_2(mixed_ckpt: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["onnx", str(mixed_ckpt), "-o", str(out), "--no-validate", *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not out.exists()


def test_cli_refuses_foreign_output(mixed_ckpt: Path, tmp_path: Path) -> None:
    as_file = tmp_path / "file"
    as_file.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for out in (as_file, foreign):
        res = CliRunner().invoke(app, ["onnx", str(mixed_ckpt), "-o", str(out), "--no-validate"])
        assert res.exit_code == 2 and str(out) in res.output, res.output
    assert as_file.read_text() == "x" and (foreign / "keep.txt").read_text() == "mine"


def test_cli_missing_checkpoint_exit_2(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["onnx", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), "--no-validate"])
    assert res.exit_code == 2 and "nope" in res.output
    assert not (tmp_path / "out").exists()


SAMPLE_DIRS = (
    sorted(p for p in SAMPLES.iterdir() if p.is_dir() and p.name != "writers" and not p.name.startswith((".", "tiny-")))
    if SAMPLES.is_dir()
    else []
)


# The full merge path (calibrate, plan, fold, export, merged reference) on two families that exercise
# different folds: GOAT (calibrated top-k routers + the shared base correction) and MOELoRA (the exact
# per-task fold). Every other sample exports unmerged; the merge math has its own tests (test_merge.py).
MERGE_PATH_SAMPLES = {"goat", "mmoelora"}


@pytest.mark.slow
@pytest.mark.parametrize("sample", SAMPLE_DIRS, ids=lambda p: p.name)
def test_sample_export_validates(sample: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every family sample exports, passes the full ONNX checker with one GroupedLoRA(-family) node per routed linear, and
    passes the `validate` gate (outputs + per-unit routing, top-p MixLoRA included): once, by `validate` here
    for the plain exports, and by the `onnx` command's own closing validate (exit 0) for the merged ones."""
    if sample.name in MERGE_PATH_SAMPLES:
        result, reference = _merged_sample_export(sample, tmp_path_factory)
    else:
        result = sample_export(tmp_path_factory, sample)
        reference = moe_export.load(sample, task_id=SAMPLE_TASK_IDS.get(sample.name)).model
        report = moe_export.validate(result.out_dir)
        assert report.passed, report.to_dict()
    onnx.checker.check_model(str(result.model_path), full_check=True)
    model = onnx.load(str(result.model_path))
    routed = sorted(u.name for u in result.manifest.routed_units if u.kind == "linear_moe")
    assert sorted(n.name for n in model.graph.node if n.op_type in LINEAR_UNIT_OP_TYPES) == routed
    # onnxruntime-genai generates the reference's tokens from the export folder as it is.
    vocab = int(json.loads((result.out_dir / "config.json").read_text())["vocab_size"])
    pad = json.loads((result.out_dir / "genai_config.json").read_text())["model"]["pad_token_id"]
    assert_genai_matches_torch(result.out_dir, reference, default_prompts(vocab, pad)[0])


def _merged_sample_export(
    sample: Path, factory: pytest.TempPathFactory
) -> tuple[onnx_export.ExportResult, torch.nn.Module]:
    """The headline `moe-export onnx --merge-threshold 0.9` export (its closing validate gate passed: exit 0),
    checked in ORT against the merged reference rebuilt from the plan in export.json (as `validate` does),
    independently of validate's own comparison."""
    from moe_export.merging import MergePlan, apply_merge_plan

    run = merged_sample_run(factory, sample)
    assert run.exit_code == 0, run.stdout + run.stderr
    assert "PASSED parity passed" in run.stdout, run.stdout  # the validate report: results on stdout
    result = export_result(run.out_dir)
    task_id = SAMPLE_TASK_IDS.get(sample.name)
    assert result.manifest.merge_plan is not None
    reloaded = moe_export.load(sample, family=result.manifest.family, task_id=task_id)
    reference = apply_merge_plan(reloaded, MergePlan.from_dict(result.manifest.merge_plan)).model
    vocab = int(json.loads((result.out_dir / "config.json").read_text())["vocab_size"])
    for shape in ((1, 1), (3, 33)):
        feeds = feeds_for(shape, vocab=vocab, seed=shape[1])
        assert_parity(ort_logits(result.model_path, feeds), torch_logits(reference, feeds), FP32_RTOL)
    return result, reference


def test_validation_runs_and_gates(fp32_export: onnx_export.ExportResult, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export ends with validate(): a passing report is returned, a failing one raises ParityError (exit 1)."""
    from rich.console import Console

    import moe_export.validation as validate_pkg

    report = api.validate_export(fp32_export.out_dir, Console(quiet=True))
    assert report is not None and report.passed

    class Failing:
        passed = False

        def render(self, console: Console) -> None:
            console.print("failing table")

    monkeypatch.setattr(validate_pkg, "validate", lambda out_dir, **options: Failing(), raising=False)
    with pytest.raises(ParityError) as info:
        api.validate_export(fp32_export.out_dir, Console(quiet=True))
    assert info.value.exit_code == 1 and isinstance(info.value.report, Failing)


def test_merge_threshold_turns_units_into_matmuls(mixed_ckpt: Path, tmp_path: Path) -> None:
    """Threshold 0.01 merges every routed unit (dominance >= 1/E): no GroupedLoRA node is left, the plan is in export.json."""
    loaded = moe_export.load(mixed_ckpt)
    result = moe_export.export_onnx(loaded, tmp_path / "merged", merge_threshold=0.01, validate=False, progress=False)
    model = onnx.load(str(result.model_path))
    assert not [n for n in model.graph.node if n.domain == DOMAIN] and not model.functions
    assert {u.status for u in result.manifest.units} == {"merged"} and result.manifest.merge_plan is not None
    assert ExportManifest.load(result.out_dir).merge_plan == result.manifest.merge_plan
    # export_onnx leaves `loaded` unmerged (issue 11): the merged reference is rebuilt from the stored plan.
    from moe_export.merging import MergePlan, apply_merge_plan

    merged = apply_merge_plan(loaded, MergePlan.from_dict(result.manifest.merge_plan)).model
    feeds = feeds_for((3, 33), vocab=64)
    assert_parity(ort_logits(result.model_path, feeds), torch_logits(merged, feeds), FP32_RTOL)
