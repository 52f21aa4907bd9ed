"""The export paths that keep one copy of the weights (issue 14, big models on one machine).

`export_onnx(consume=True)` folds and casts the caller's model in place and takes it (`loaded.model` is None);
without it the caller's model is never changed, and a fp16 export casts a copy of the weights, not of the model.
The CLI consumes, and loads the model straight in the export dtype when no merge needs fp32: its fp16 export
then rounds W to fp16 before the shared LoRAs fold in (fp16(fp16(W) + Δ)) where the API rounds once
(fp16(W + Δ)). Memory figures are in benchmarks/big_model.py, never asserted here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

import moe_export
from moe_export.cli import app
from moe_export.errors import ExportError
from moe_export.ir.fold import shared_delta
from moe_export.reference import loading
from moe_export.reference.model import cast_reference_model
from tests.test_no_mutation import assert_unchanged, snapshot
from tests.test_onnx_export import feeds_for, mixed_adapter, ort_logits, torch_logits


@pytest.fixture(scope="module")
def ckpt(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Top-2 and dense units, every one with a shared LoRA: every adapted weight is folded before export."""
    return mixed_adapter(tiny_base).save(tmp_path_factory.mktemp("mem") / "ckpt")


@pytest.fixture(scope="module")
def api_fp16(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The API's fp16 export of a fp32-loaded model: folded in fp32, rounded once."""
    loaded = moe_export.load(ckpt)
    before = snapshot(loaded)
    result = moe_export.export_onnx(loaded, tmp_path_factory.mktemp("api") / "fp16", dtype="fp16", validate=False)
    assert_unchanged(loaded, before, "export_onnx(dtype='fp16')")  # the cast went to a copy of the weights
    return result.model_path


def initializers(model_path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model_path)).graph.initializer}


def test_consume_takes_the_model_and_exports_the_same_graph(ckpt: Path, tmp_path: Path) -> None:
    kept = moe_export.export_onnx(moe_export.load(ckpt), tmp_path / "kept", validate=False, progress=False)
    loaded = moe_export.load(ckpt)
    # Loaded in the file's dtype, the weights are pages of the safetensors mapping: a fold in place must write
    # to private copies of them, never to the user's base model on disk.
    files = {p: p.read_bytes() for p in loaded.base_model_path.iterdir() if p.is_file()}
    taken = moe_export.export_onnx(loaded, tmp_path / "taken", validate=False, progress=False, consume=True)
    assert loaded.model is None, "a consumed model must not stay reachable half-folded"
    assert all(p.read_bytes() == data for p, data in files.items()), "the base model on disk changed"
    want, got = initializers(kept.model_path), initializers(taken.model_path)
    assert sorted(got) == sorted(want)
    differ = [k for k in want if not np.array_equal(want[k], got[k])]
    assert not differ, f"folding in place changed {differ[:3]}"
    with pytest.raises(ExportError, match="consume"):
        moe_export.export_onnx(loaded, tmp_path / "again", validate=False, progress=False)


def test_cli_fp16_loads_in_fp16_with_the_api_parity(
    ckpt: Path, api_fp16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dtypes: list[torch.dtype] = []
    real = loading.load_base_model

    def spy(path: Path, dtype: torch.dtype = torch.float32) -> object:
        dtypes.append(dtype)
        return real(path, dtype)

    monkeypatch.setattr(loading, "load_base_model", spy)
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["onnx", str(ckpt), "--dtype", "fp16", "--no-validate", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert dtypes == [torch.float16], "the CLI builds one model, in the export dtype"

    # Weight by weight, from the fp32 base and the adapter's shared LoRAs: the API rounds once, the CLI rounds W
    # to fp16 as it loads and then folds (the same fp32 sum, fp16(fp16(W) + d)); both exports hold W^T.
    fresh = moe_export.load(ckpt)
    for unit in fresh.adapter.units:
        w = fresh.model.get_submodule(unit.name).base.weight.detach()  # [D_out, D_in] fp32
        delta = shared_delta(unit)  # type: ignore[arg-type]
        assert delta is not None, "every unit of this checkpoint has a shared LoRA"
        for path, folded in ((api_fp16, w + delta), (out / "model.onnx", w.half().float() + delta)):
            want = folded.half().T.numpy()
            held = [a for a in initializers(path).values() if a.shape == want.shape and np.array_equal(a, want)]
            assert held, f"{path.parent.name}: no initializer holds the folded {unit.name}"

    # And the logits hold the same parity with the fp16 reference as test_fp16_export's (see its tolerance note).
    feeds = feeds_for((3, 33), vocab=64, seed=5)
    reference = torch_logits(cast_reference_model(moe_export.load(ckpt).model, torch.float16), feeds)
    for path in (api_fp16, out / "model.onnx"):
        logits = ort_logits(path, feeds)
        err = np.abs(logits.astype(np.float32) - reference).max(-1) / np.abs(reference).max()  # [B, S]
        assert (err < 1e-2).mean() >= 0.9, f"{path}: positions within 1e-2: {(err < 1e-2).mean():.2f}"
        assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.9


def test_cli_base_only_builds_no_adapter_model(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    monkeypatch.setattr(loading, "apply_adapter", lambda *a, **k: built.append(a))
    out = tmp_path / "base"
    res = CliRunner().invoke(app, ["onnx", str(ckpt), "--base-only", "--no-validate", "--no-kv-cache", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert built == [] and (out / "model.onnx").is_file()
