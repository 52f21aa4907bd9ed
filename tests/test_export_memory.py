"""The export paths that keep one copy of the weights (issue 14, big models on one machine).

`export_onnx(consume=True)` folds and casts the caller's model in place and takes it (`loaded.model` is None);
without it the caller's model is never changed, and a fp16 export casts a copy of the weights, not of the model.
The CLI consumes, and loads the model straight in the export dtype when the base is stored in it and no merge
needs fp32; otherwise in fp32, cast in place after the folds. Either way a folded weight is fp16(W + Δ), rounded
once, as the API's. Memory figures are in benchmarks/big_model.py, never asserted here.
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


def _cli_fp16_export(ckpt: Path, out: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> list[torch.dtype]:
    """Run `onnx --dtype fp16` in-process; returns the dtypes the base models were built in."""
    dtypes: list[torch.dtype] = []
    real = loading.load_base_model

    def spy(path: Path, dtype: torch.dtype = torch.float32) -> object:
        dtypes.append(dtype)
        return real(path, dtype)

    monkeypatch.setattr(loading, "load_base_model", spy)
    res = CliRunner().invoke(app, ["onnx", str(ckpt), "--dtype", "fp16", "--no-validate", "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    return dtypes


def _holds_folded(path: Path, loaded: moe_export.LoadedAdapter) -> None:
    """Every folded weight in the export is fp16(W + Δ): W as the base stores it, the fp32 sum rounded once."""
    for unit in loaded.adapter.units:
        w = loaded.model.get_submodule(unit.name).base.weight.detach().float()  # [D_out, D_in]
        delta = shared_delta(unit)  # type: ignore[arg-type]
        assert delta is not None, "every unit of this checkpoint has a shared LoRA"
        want = (w + delta).half().T.numpy()
        held = [a for a in initializers(path).values() if a.shape == want.shape and np.array_equal(a, want)]
        assert held, f"{path.parent.name}: no initializer holds the folded {unit.name}"


def test_cli_fp16_of_a_fp32_base_folds_in_fp32_like_the_api(
    ckpt: Path, api_fp16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fp32-stored base is loaded in fp32 (loading it in fp16 would round W before the fold, twice in all:
    that flipped a near-tie route on samples/goat's fp16 export), then cast in place after the folds."""
    out = tmp_path / "cli"
    assert _cli_fp16_export(ckpt, out, monkeypatch) == [torch.float32], "one model, in fp32"
    fresh = moe_export.load(ckpt)
    _holds_folded(api_fp16, fresh)
    _holds_folded(out / "model.onnx", fresh)

    # And the logits hold the same parity with the fp16 reference as test_fp16_export's (see its tolerance note).
    feeds = feeds_for((3, 33), vocab=64, seed=5)
    reference = torch_logits(cast_reference_model(fresh.model, torch.float16), feeds)
    for path in (api_fp16, out / "model.onnx"):
        logits = ort_logits(path, feeds)
        err = np.abs(logits.astype(np.float32) - reference).max(-1) / np.abs(reference).max()  # [B, S]
        assert (err < 1e-2).mean() >= 0.9, f"{path}: positions within 1e-2: {(err < 1e-2).mean():.2f}"
        assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.9


def test_cli_fp16_of_a_fp16_base_loads_in_fp16(
    ckpt: Path, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base stored in the export dtype is loaded in it: one copy of the weights, W exact, one rounding."""
    base16 = tmp_path / "base16"
    loading.load_base_model(tiny_base, torch.float16).save_pretrained(str(base16))
    out = tmp_path / "cli16"
    assert _cli_fp16_export(ckpt, out, monkeypatch, "--base", str(base16)) == [torch.float16]
    _holds_folded(out / "model.onnx", moe_export.load(ckpt, base_model=base16))


def test_cli_base_only_builds_no_adapter_model(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    monkeypatch.setattr(loading, "apply_adapter", lambda *a, **k: built.append(a))
    out = tmp_path / "base"
    res = CliRunner().invoke(app, ["onnx", str(ckpt), "--base-only", "--no-validate", "--no-kv-cache", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert built == [] and (out / "model.onnx").is_file()
