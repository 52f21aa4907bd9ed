"""GOAT's base-weight correction vs a direct re-run of GOAT's `svd_init` arithmetic, per init type."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.goat import goat_scaling
from moe_export.reference.loading import load_adapter
from samples.writers import goat as goat_writer
from tests.conftest import SAMPLES

BASE = SAMPLES / "tiny-llama"
RHO = 10


def goat_modified_weight(w: torch.Tensor, init_type: str, r: int, num_experts: int, init_cof: float, s: float):
    """W' exactly as GOAT-PEFT's layer.py svd_init computes it (same slicing, sqrt split and subtraction)."""
    weight = w.to(torch.float32)
    V, S, Uh = torch.linalg.svd(weight, full_matrices=False)
    if init_type == "milora":
        Vr, Sr, Uhr = V[:, -r:], S[-r:], Uh[-r:]
    elif init_type == "pissa":
        Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r]
    elif init_type == "pissa_milora":
        Vr = torch.cat((V[:, : r // 2], V[:, -r // 2 :]), dim=1)
        Sr = torch.cat((S[: r // 2], S[-r // 2 :]))
        Uhr = torch.cat((Uh[: r // 2], Uh[-r // 2 :]), dim=0)
    else:
        vlen, mlen = V.shape[-1] // num_experts, r // num_experts
        if init_type == "goat":
            span = [(i * vlen, i * vlen + mlen) for i in range(num_experts)]
        else:  # goat_mini
            span = [((i + 1) * vlen - mlen, (i + 1) * vlen) for i in range(num_experts)]
        Vr = torch.cat([V[:, a:b] for a, b in span], dim=1)
        Sr = torch.cat([S[a:b] for a, b in span])
        Uhr = torch.cat([Uh[a:b] for a, b in span], dim=0)
    Sr = Sr / (s * RHO)
    lora_a = torch.diag(torch.sqrt(Sr)) @ Uhr
    lora_b = Vr @ torch.diag(torch.sqrt(Sr))
    return weight - init_cof * s * lora_b @ lora_a


@pytest.mark.parametrize(
    ("init_type", "rank"),
    # r=12, E=4: experts of rank 3; r=5: experts of rank 1 (GOAT uses r // E), the SVD still takes r
    # components, and pissa_milora's odd split takes r // 2 = 2 from the top and -(-5 // 2) = 3 from the bottom
    [("goat", 8), ("goat_mini", 8), ("pissa", 8), ("milora", 8), ("pissa_milora", 5), ("goat", 12)],
)
def test_correction_matches_goat_svd_init(tmp_path: Path, init_type: str, rank: int) -> None:
    ckpt = tmp_path / "goat"
    goat_writer.write(ckpt, BASE, init_type=init_type, rank=rank)
    adapter, _ = load_adapter(ckpt, base_model=BASE)
    base = BaseWeights(BASE)
    assert adapter.source_config["goat_base_correction"]["svd_select"] == init_type
    for unit in adapter.units:
        (shared,) = unit.shared
        assert shared.origin == "goat_base_correction" and shared.A.shape[0] == rank
        w = base.linear_weight(unit.name)
        s = goat_scaling(init_type, 16, rank, 4, unit.in_features)
        want = goat_modified_weight(w, init_type, rank, 4, 0.25, s) - w.float()
        torch.testing.assert_close(shared.delta(), want, rtol=1e-4, atol=1e-6)
        # the correction is rank r and small (init_cof / rho of the selected spectrum), but not zero
        assert 0 < shared.delta().norm() < 0.1 * w.norm()


def test_no_correction_without_svd_init(tmp_path: Path) -> None:
    ckpt = tmp_path / "goat"
    goat_writer.write(ckpt, BASE, init_type="lora")
    adapter, _ = load_adapter(ckpt, base_model=BASE)
    assert all(not u.shared for u in adapter.units)
    assert adapter.source_config["goat_base_correction"] is None


@pytest.mark.parametrize(
    ("init_type", "want"),
    [
        ("goat", 16 / 2),  # alpha / (r / E), the released setting
        ("pissa", 2.0),
        ("bert", 1.0),
        ("guassian", 1.0),
        ("lora_scale", math.sqrt(3 * 64 / 2)),  # sqrt(3 * ETA * in / (r / E)), ETA = 1
        ("rslora", 16 / math.sqrt(2)),  # "rs" in init_type
    ],
)
def test_goat_scaling_rules(init_type: str, want: float) -> None:
    assert goat_scaling(init_type, alpha=16, rank=8, num_experts=4, in_features=64) == pytest.approx(want)
