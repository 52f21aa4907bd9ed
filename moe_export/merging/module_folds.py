"""A merge plan applied to reference modules in place: checked against the adapter first, then folded.

The whole-model merge (apply.apply_merge_plan, on a copy of the model) and the layer-streamed held-out
measurement (layerwise.py, on a freshly loaded decoder layer) both fold through here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from moe_export.errors import MergeError
from moe_export.ir import Adapter, LinearMoE
from moe_export.ir.fold import fold_into_weight
from moe_export.merging.plan import MergePlan, UnitMerge


def check_plan(adapter: Adapter, plan: MergePlan, checkpoint: str | Path, task_id: int | None) -> dict[str, LinearMoE]:
    """Every entry must fit the adapter; checked before anything is mutated. Returns the linear units by name."""
    units = {u.name: u for u in adapter.units if isinstance(u, LinearMoE)}
    where = f"merge plan for {checkpoint}"
    for entry in plan.units:
        unit = units.get(entry.name)
        if unit is None:
            raise MergeError(f"{where}: unit {entry.name} is not a linear unit of this adapter; was it already merged?")
        if entry.fold_shared and not unit.shared:
            raise MergeError(f"{where}: unit {entry.name} has no shared LoRA to fold")
        num_experts = unit.experts.num_experts if unit.experts is not None else 0
        if entry.expert_weights is not None and len(entry.expert_weights) != num_experts:
            raise MergeError(
                f"{where}: unit {entry.name} has {num_experts} experts, the plan {len(entry.expert_weights)}"
            )
        if entry.reason == "exact-task" and plan.task_id != task_id:
            raise MergeError(f"{where}: the plan folds task {plan.task_id}, the model was loaded for task {task_id}")
    return units


@torch.no_grad()
def fold_entries(model: nn.Module, entries: Iterable[UnitMerge], units: dict[str, LinearMoE]) -> None:
    """Fold each entry into its MoELoRALinear in `model`, in place: W + Δ̄ (fp32 sum, cast once); a unit that
    becomes linear is replaced by its base nn.Linear, one that stays routed only loses its shared branch."""
    for entry in entries:
        module, unit = model.get_submodule(entry.name), units[entry.name]
        fold_into_weight(module.base.weight, unit, entry)
        if entry.becomes_linear:
            parent, _, child = entry.name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.base)
        else:
            # Shared LoRAs are already in W: a unit without them only drops the shared branch.
            module.fold_shared_into_base(dataclasses.replace(unit, shared=[]))
