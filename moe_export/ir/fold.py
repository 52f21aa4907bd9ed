"""Input-independent weight deltas: the exact folds shared by export and merge.

Everything is computed in fp32 and cast once when written into a weight.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_export.ir.units import ExpertStack, LinearMoE


def shared_delta(unit: LinearMoE) -> torch.Tensor | None:
    """[D_out, D_in] sum of the always-on LoRAs of a unit, or None if it has none."""
    if not unit.shared:
        return None
    return sum(s.delta() for s in unit.shared)  # type: ignore[return-value]


def static_expert_delta(stack: ExpertStack, weights: torch.Tensor) -> torch.Tensor:
    """[D_out, D_in] sum_e w_e s_e B_e A_e for fixed expert weights [E] (a constant router, or a mean gate)."""
    w = weights.float() * stack.scaling.float()  # [E]
    b = stack.B.float() * w[:, None, None]  # [E, D_out, R]
    if stack.A.shape[0] == 1:
        return b.sum(0) @ stack.A[0].float()
    return torch.einsum("eor,eri->oi", b, stack.A.float())


@torch.no_grad()
def add_to_linear(linear: nn.Linear, delta: torch.Tensor) -> None:
    """W <- W + delta, summed in fp32 and stored back in W's dtype."""
    linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))
