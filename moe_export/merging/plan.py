"""Which units fold into the base weights, and with which static expert weights (docs/merging.md).

A plan is data: it names units and stores their static expert weights, so `apply_merge_plan` (and the
validator, from export.json) rebuilds the merged model exactly without the calibration run.
Legend: E experts, D_in / D_out linear sizes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moe_export.errors import MergeError
from moe_export.files import known_fields
from moe_export.ir import Adapter, LinearMoE
from moe_export.merging.options import check_merge_choice
from moe_export.merging.statistics import CalibrationStats
from moe_export.ops.grouped_lora import dense_gates
from moe_export.reference.routing import route_constant, router_probabilities, select_experts

PLAN_VERSION = 1
EXACT_REASONS = ("exact-shared", "exact-single-expert", "exact-task", "exact-constant")


@dataclass
class UnitMerge:
    """One unit's fold: its shared LoRAs and/or its routed experts with fixed weights."""

    name: str = field(metadata={"help": "unit (HF module path of the nn.Linear)"})
    reason: str = field(
        metadata={"help": "exact-shared|exact-single-expert|exact-task|exact-constant|threshold|budget"}
    )
    fold_shared: bool = field(default=False, metadata={"help": "fold the always-on shared LoRAs (exact)"})
    expert_weights: list[float] | None = field(
        default=None, metadata={"help": "[E] static expert weights of the fold; None: the experts stay routed"}
    )
    dominance: float | None = field(default=None, metadata={"help": "max_e ḡ_e from calibration"})
    error_predicted: float | None = field(default=None, metadata={"help": "ε on the calibration tokens"})

    def __post_init__(self) -> None:
        if self.reason not in (*EXACT_REASONS, "threshold", "budget"):
            raise MergeError(f"merge plan: unit {self.name} has unknown reason {self.reason!r}")

    @property
    def exact(self) -> bool:
        return self.reason in EXACT_REASONS

    @property
    def becomes_linear(self) -> bool:
        """The unit turns into a plain nn.Linear: its experts are folded ([] when it has none)."""
        return self.expert_weights is not None


@dataclass
class MergePlan:
    """Every fold of one merge, in adapter order; round-trips JSON (stored in export.json)."""

    units: list[UnitMerge] = field(default_factory=list, metadata={"help": "folds, one per touched unit"})
    threshold: float | None = field(default=None, metadata={"help": "--merge-threshold T (dominance ≥ T merges)"})
    budget: float | None = field(default=None, metadata={"help": "--merge-budget B (Σ predicted ε ≤ B)"})
    task_id: int | None = field(default=None, metadata={"help": "task id the task-routed folds used"})
    notices: list[str] = field(default_factory=list, metadata={"help": "units skipped, and why"})
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        check_merge_choice(self.threshold, self.budget)

    def entry(self, name: str) -> UnitMerge | None:
        return next((u for u in self.units if u.name == name), None)

    @property
    def merged_units(self) -> list[str]:
        """Units that become plain Linears (their experts folded, or no experts at all)."""
        return [u.name for u in self.units if u.becomes_linear]

    @property
    def predicted_error(self) -> float:
        return sum(u.error_predicted or 0.0 for u in self.units if u.becomes_linear)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "merge plan") -> MergePlan:
        kept = known_fields(cls, data, where)
        try:
            units = [UnitMerge(**known_fields(UnitMerge, u, where)) for u in kept.pop("units", [])]
            return cls(**kept, units=units)
        except (TypeError, AttributeError) as exc:
            raise MergeError(f"{where}: not a merge plan ({exc})") from exc


def exact_expert_weights(unit: LinearMoE, adapter: Adapter, task_id: int | None) -> tuple[str, torch.Tensor] | None:
    """(reason, [E] fp32 weights) when the unit's routing does not depend on its input, else None.

    The weights go through the same selection code as the reference forward (top-k, renormalise),
    so the fold equals what every token computes."""
    router, stack = unit.router, unit.experts
    assert router is not None and stack is not None
    e = stack.num_experts
    if e == 1:
        ids, gates = select_experts(router, torch.ones(1, 1))  # softmax over one expert is 1
        return "exact-single-expert", dense_gates(ids, gates, 1, torch.float32)[0]
    if router.kind == "task":
        if task_id is None:
            return None
        assert router.task_gate is not None
        ids, gates = route_constant(router, adapter.task_gates[router.task_gate].weights(task_id), 1)
        return "exact-task", dense_gates(ids, gates, e, torch.float32)[0]
    weight = router.weight
    if router.kind == "linear" and weight is not None and bool((weight == weight[:1]).all()):
        # Equal router rows: every token's logits differ only by the bias, so the softmax is constant.
        probs = router_probabilities(router, torch.zeros(1, unit.in_features, dtype=weight.dtype), weight, router.bias)
        if router.select == "topk":
            assert router.top_k is not None
            ranked = probs[0].sort(descending=True).values  # [E]
            if router.top_k < e and bool(ranked[router.top_k - 1] == ranked[router.top_k]):
                return None  # a tie at the top-k boundary: which experts win is not a property of the weights
        ids, gates = select_experts(router, probs)
        return "exact-constant", dense_gates(ids, gates, e, torch.float32)[0]
    return None


def plan_merge(
    adapter: Adapter,
    stats: CalibrationStats | None,
    threshold: float | None = None,
    budget: float | None = None,
    task_id: int | None = None,
) -> MergePlan:
    """Exact folds always; plus units whose dominance ≥ threshold, or the lowest-ε units within budget."""
    check_merge_choice(threshold, budget)
    plan = MergePlan(threshold=threshold, budget=budget, task_id=task_id)
    candidates: list[LinearMoE] = []
    for unit in adapter.units:
        if not isinstance(unit, LinearMoE):
            plan.notices.append(f"{unit.name}: {unit.kind} units are not merged (yet); it stays routed")
            continue
        if not unit.routed:
            if unit.shared:
                plan.units.append(UnitMerge(unit.name, "exact-shared", fold_shared=True, expert_weights=[]))
            continue
        exact = exact_expert_weights(unit, adapter, task_id)
        if exact is not None:
            reason, weights = exact
            plan.units.append(
                UnitMerge(unit.name, reason, bool(unit.shared), weights.tolist(), float(weights.max()), 0.0)
            )
        else:
            candidates.append(unit)
    chosen = _choose(candidates, stats, threshold, budget)
    for unit in candidates:
        pick = chosen.get(unit.name)
        if pick is not None:
            plan.units.append(pick)
        elif unit.shared:
            plan.units.append(UnitMerge(unit.name, "exact-shared", fold_shared=True))
    order = {u.name: i for i, u in enumerate(adapter.units)}
    plan.units.sort(key=lambda u: order[u.name])
    return plan


def _choose(
    candidates: list[LinearMoE], stats: CalibrationStats | None, threshold: float | None, budget: float | None
) -> dict[str, UnitMerge]:
    """The input-dependent units to replace by their mean-gate static delta."""
    if not candidates or (threshold is None and budget is None):
        return {}
    if stats is None:
        raise MergeError("a --merge-threshold/--merge-budget merge needs calibration statistics (--stats or --data)")
    missing = [u.name for u in candidates if u.name not in stats.units]
    if missing:
        raise MergeError(
            f"stats from {stats.checkpoint} have no unit {missing[0]} ({len(missing)} missing); recalibrate this checkpoint"
        )

    def fold(unit: LinearMoE, reason: str) -> UnitMerge:
        s = stats.units[unit.name]
        return UnitMerge(unit.name, reason, bool(unit.shared), list(s.mean_gate), s.dominance, s.error)

    if threshold is not None:
        return {u.name: fold(u, "threshold") for u in candidates if stats.units[u.name].dominance >= threshold}
    assert budget is not None
    ranked = sorted(candidates, key=lambda u: (_error_or_inf(stats, u.name), u.name))
    chosen, total = {}, 0.0
    for unit in ranked:
        total += _error_or_inf(stats, unit.name)
        if total > budget:
            break
        chosen[unit.name] = fold(unit, "budget")
    return chosen


def _error_or_inf(stats: CalibrationStats, name: str) -> float:
    error = stats.units[name].error
    return float("inf") if error is None or math.isnan(error) else error  # never merge an unmeasured unit
