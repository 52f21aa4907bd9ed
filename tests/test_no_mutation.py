"""No API function changes the caller's LoadedAdapter (README.md, Python API; issue 11).

Before the fix, `export_onnx` folded GOAT's shared correction into `loaded.model` while `loaded.adapter`
still listed it, so a later merge folded it again (logits off by 9.4e-2 relative on samples/goat).
Here one loaded object goes through export -> calibrate -> merge -> export, and every result is
compared with the same step on a fresh load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import moe_export
from moe_export.merging import calibrate, merge
from tests.conftest import SAMPLES
from tests.test_onnx_export import feeds_for, ort_logits, torch_logits

SAMPLE = SAMPLES / "goat"  # every unit carries a shared LoRA (the base correction): the case that broke
# Threshold 1.0: no routed unit of samples/goat is that dominant (its collapsed routers reach 0.97), so the merge
# folds exactly the shared corrections and the merged model must equal the unmerged reference.
MERGE = {"threshold": 1.0, "samples": 4, "seq_len": 16, "progress": False}


def snapshot(loaded: moe_export.LoadedAdapter) -> dict[str, object]:
    """Everything a fold could touch: every parameter and buffer (adapter buffers are non-persistent, so
    not in state_dict), the module tree, and the canonical adapter's tensors and manifest."""
    model = loaded.model
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters(remove_duplicate=False)},
        "buffers": {k: v.clone() for k, v in model.named_buffers(remove_duplicate=False)},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "adapter": {k: v.clone() for k, v in loaded.adapter.tensors().items()},
        "manifest": loaded.adapter.to_manifest(),
    }


def assert_unchanged(loaded: moe_export.LoadedAdapter, before: dict[str, object], step: str) -> None:
    after = snapshot(loaded)
    assert after["modules"] == before["modules"], f"{step} changed the module tree"
    assert after["manifest"] == before["manifest"], f"{step} changed the adapter"
    for group in ("params", "buffers", "adapter"):
        want, got = before[group], after[group]
        assert sorted(got) == sorted(want), f"{step} added or removed {group}"  # type: ignore[arg-type]
        changed = [k for k in want if not torch.equal(want[k], got[k])]  # type: ignore[index]
        assert not changed, f"{step} changed {group} {changed[:3]}"


def test_export_merge_export_on_one_object_equals_fresh_loads(tmp_path: Path) -> None:
    loaded = moe_export.load(SAMPLE)
    before = snapshot(loaded)
    feeds = feeds_for((2, 9), vocab=256, seed=4)
    fresh_logits = torch_logits(moe_export.load(SAMPLE).model, feeds)

    first = moe_export.export_onnx(loaded, tmp_path / "first", validate=False, progress=False)
    assert_unchanged(loaded, before, "export_onnx")
    first_ort = ort_logits(first.model_path, feeds)
    assert np.abs(first_ort - fresh_logits).max() <= 1e-4 * np.abs(fresh_logits).max()
    assert np.array_equal(torch_logits(loaded.model, feeds), fresh_logits)

    calibrate(loaded, samples=2, seq_len=8, progress=False)
    assert_unchanged(loaded, before, "calibrate")

    merged = merge(loaded, **MERGE)
    assert_unchanged(loaded, before, "merge")
    fresh_merged = merge(moe_export.load(SAMPLE), **MERGE)
    assert merged.plan.to_dict() == fresh_merged.plan.to_dict()
    assert {e.name for e in merged.plan.units if e.fold_shared} == {u.name for u in loaded.adapter.units}
    merged_logits = torch_logits(merged.loaded.model, feeds)
    assert np.array_equal(merged_logits, torch_logits(fresh_merged.loaded.model, feeds))
    # Folded once, the shared correction is exact (folded twice it was 9.4e-2 off); independently of the
    # merge's own report, compare with the unmerged fresh reference.
    assert np.abs(merged_logits - fresh_logits).max() <= 1e-5 * np.abs(fresh_logits).max()

    second = moe_export.export_onnx(loaded, tmp_path / "second", validate=False, progress=False)
    assert_unchanged(loaded, before, "a second export_onnx")
    np.testing.assert_array_equal(ort_logits(second.model_path, feeds), first_ort)
