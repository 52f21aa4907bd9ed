"""Input-independent weight deltas and the one fold W <- W + Δ (reference, export and merge share it).

It lives below the reference and merge stages because both fold. Everything is computed in fp32 and
cast once when written into a weight.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import torch

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


class FoldSpec(Protocol):
    """What to fold into one unit's weight (merging.plan.UnitMerge is one)."""

    fold_shared: bool  # the always-on shared LoRAs (exact)
    expert_weights: list[float] | None  # [E] static expert weights; None or []: the experts are not folded


@dataclasses.dataclass(frozen=True)
class SharedOnly:
    """Fold only the shared LoRAs (what export does before tracing)."""

    fold_shared: bool = True
    expert_weights: list[float] | None = None


ROW_BLOCK = 1024  # output rows of a weight folded at a time: bounds the fp32 delta in memory


def unit_delta(unit: LinearMoE, entry: FoldSpec, rows: slice = slice(None)) -> torch.Tensor | None:
    """[rows of D_out, D_in] fp32 weight delta of a fold (shared LoRAs + static experts), or None if empty.

    Row slices only cut B's output dimension, so a block of the delta costs a block of memory."""
    delta = None
    if entry.fold_shared:
        shared = [dataclasses.replace(s, B=s.B[rows]) for s in unit.shared]
        out = shared[0].B.shape[0] if shared else unit.out_features
        delta = shared_delta(dataclasses.replace(unit, out_features=out, experts=None, router=None, shared=shared))
    if entry.expert_weights:  # [] marks a unit without experts
        assert unit.experts is not None
        stack = dataclasses.replace(unit.experts, B=unit.experts.B[:, rows])
        experts = static_expert_delta(stack, torch.tensor(entry.expert_weights, dtype=torch.float64))
        delta = experts if delta is None else delta.add_(experts)  # in place: one block fewer
    return delta


@torch.no_grad()
def fold_into_weight(weight: torch.Tensor, unit: LinearMoE, entry: FoldSpec) -> None:
    """W <- cast(float(W) + Δ) in place, summed in fp32, one block of rows at a time.

    The one fold: the reference (shared LoRAs before export), the in-memory merge (apply_merge_plan)
    and the streaming writer all call it, so they produce the same bits."""
    unmap_large_frees()
    for start in range(0, weight.shape[0], ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        delta = unit_delta(unit, entry, rows)  # [block, D_in]
        if delta is None:
            return
        weight[rows] = (weight[rows].float() + delta.to(weight.device)).to(weight.dtype)


@functools.cache
def unmap_large_frees() -> None:
    """Pin glibc's mmap threshold at 1 MiB: by default it adapts upward to 32 MiB after the first large free,
    so the fold's block-sized temporaries land on the heap and stay in RSS (measured: +190 MB on one
    11008x4096 weight). Mapped blocks go back to the OS when freed. No-op off glibc."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim): memory a released ONNX Runtime session or
    freed tensors left below the mmap threshold otherwise stays in RSS until it is reused. No-op off glibc."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
