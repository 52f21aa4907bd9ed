"""The reference wrapper vs the independent loop, on synthetic adapters over a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from moe_export.reference.loading import load_base_model
from moe_export.reference.model import apply_adapter
from tests.loop_reference import apply_loop_reference
from tests.tiny import random_adapter


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 2},
        {"top_k": None},  # dense
        {"top_k": 1, "with_shared": False},
        {"top_k": None, "shared_a": True},  # HydraLoRA-style shared A
    ],
    ids=["top2", "dense", "top1", "shared-a"],
)
def test_reference_matches_loop(tiny_base, kwargs) -> None:
    adapter = random_adapter(**kwargs)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    ours = apply_adapter(load_base_model(tiny_base), adapter)
    loop = apply_loop_reference(load_base_model(tiny_base), adapter)
    base = _logits(load_base_model(tiny_base), ids)
    got, want = _logits(ours, ids), _logits(loop, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3, "the adapter must change the logits"
