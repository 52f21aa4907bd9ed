"""Merge: fold exact and dominant experts into the base weights, and report what it costs (DESIGN.md section 6).

plan_merge(adapter, stats, ...)  -> MergePlan      (merge_plan.py: pure data, JSON round trip)
apply_merge_plan(loaded, plan)   -> LoadedAdapter  (merged reference model + the adapter left routed)
merge(loaded, threshold=...)     -> MergeResult    (calibrate if needed, plan, apply, held-out report)
save_merged(result, out_dir)     -> Path           (merge_write.py: streaming HF model dir)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_export.calibration import (
    CalibrationStats,
    UnitAccumulator,
    calibrate,
    calibration_inputs,
    recording,
    routed_linear_units,
    run_samples,
)
from moe_export.errors import MergeError
from moe_export.ir import Adapter, LinearMoE, short_unit_name
from moe_export.merge_plan import (
    MergePlan,
    UnitMerge,
    check_options,
    exact_expert_weights,
    fold_into_weight,
    plan_merge,
)
from moe_export.merge_write import save_merged
from moe_export.model_copy import copy_for_edit
from moe_export.reference import MoELoRALinear

if TYPE_CHECKING:
    from rich.console import Console

    from moe_export.loading import LoadedAdapter

__all__ = ["MergePlan", "MergeReport", "MergeResult", "apply_merge_plan", "merge", "plan_merge", "save_merged"]


def remaining_adapter(adapter: Adapter, plan: MergePlan) -> Adapter:
    """The units that stay routed after the plan, without their folded shared LoRAs."""
    entries = {e.name: e for e in plan.units}
    units = []
    for unit in adapter.units:
        entry = entries.get(unit.name)
        if entry is None:
            units.append(unit)
        elif not entry.becomes_linear:
            units.append(dataclasses.replace(unit, shared=[]) if entry.fold_shared else unit)
    used = {u.router.task_gate for u in units if u.router is not None and u.router.kind == "task"}
    folded = sum(e.becomes_linear for e in plan.units)
    return Adapter(
        family=adapter.family,
        units=units,
        base_model=adapter.base_model,
        task_gates={k: v for k, v in adapter.task_gates.items() if k in used},
        source_config=adapter.source_config,
        notices=[*adapter.notices, f"moe-export merge: {folded} unit(s) folded into the base weights"],
    )


def _check_plan(loaded: LoadedAdapter, plan: MergePlan) -> dict[str, LinearMoE]:
    """Every entry must fit the loaded adapter; checked before anything is mutated."""
    units = {u.name: u for u in loaded.adapter.units if isinstance(u, LinearMoE)}
    where = f"merge plan for {loaded.checkpoint}"
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
        if entry.reason == "exact-task" and plan.task_id != loaded.task_id:
            raise MergeError(
                f"{where}: the plan folds task {plan.task_id}, the model was loaded for task {loaded.task_id}"
            )
    return units


@torch.no_grad()
def apply_merge_plan(loaded: LoadedAdapter, plan: MergePlan) -> LoadedAdapter:
    """Apply a plan to a copy of the reference model and return it with the adapter that stays routed;
    `loaded` is not changed. The copy shares every weight the plan does not touch (model_copy.py).
    Folded units become plain nn.Linear with W + Δ̄ (fp32 sum, cast once).
    The result depends on the plan only, so a plan read back from JSON rebuilds the same weights."""
    units = _check_plan(loaded, plan)
    model = loaded.model
    if model is not None:
        modules = {e.name: model.get_submodule(e.name) for e in plan.units}
        wrong = [n for n, m in modules.items() if not isinstance(m, MoELoRALinear)]
        if wrong:
            raise MergeError(f"{loaded.checkpoint}: {wrong[0]} is not an adapter module in the model (merged twice?)")
        model = copy_for_edit(model, [m.base.weight for m in modules.values()])
        modules = {e.name: model.get_submodule(e.name) for e in plan.units}
        for entry in plan.units:
            module, unit = modules[entry.name], units[entry.name]
            fold_into_weight(module.base.weight, unit, entry)
            if entry.becomes_linear:
                parent, _, child = entry.name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.base)
            else:
                # Shared LoRAs are already in W: a unit without them only drops the shared branch.
                module.fold_shared_into_base(dataclasses.replace(unit, shared=[]))
    return dataclasses.replace(loaded, adapter=remaining_adapter(loaded.adapter, plan), model=model)


@dataclass
class UnitReport:
    """One row of the merge table."""

    name: str
    num_experts: int
    action: str  # the plan's reason, "routed" (kept), or "skipped"
    shared_folded: bool = False
    dominance: float | None = None
    entropy: float | None = None
    error_predicted: float | None = None  # ε on the calibration tokens
    error_measured: float | None = None  # ε of the fold on held-out tokens


@dataclass
class MergeReport:
    """What a merge did and what it cost, per unit and on the whole model's logits (held-out tokens)."""

    units: list[UnitReport] = field(default_factory=list)
    logits_rel_error: float | None = None  # ‖L_merged − L_ref‖ / ‖L_ref‖ over all held-out tokens
    top1_agreement: float | None = None  # fraction of held-out tokens whose argmax agrees
    heldout_tokens: int = 0
    heldout_source: str | None = None
    threshold: float | None = None
    budget: float | None = None
    notices: list[str] = field(default_factory=list)

    @property
    def merged(self) -> list[UnitReport]:
        return [u for u in self.units if u.action not in ("routed", "skipped")]

    @property
    def predicted_total(self) -> float:
        return sum(u.error_predicted or 0.0 for u in self.merged if u.num_experts)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["predicted_total"] = self.predicted_total
        return data

    def render(self, console: Console) -> None:
        from rich.table import Table

        def num(v: float | None, fmt: str = ".3g") -> str:
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

        table = Table(title="moe-export merge (L = decoder layer)", title_justify="left")
        for col in ("unit", "E", "action", "dominance", "entropy", "ε predicted", "ε measured"):
            table.add_column(col, justify="left" if col in ("unit", "action") else "right", no_wrap=col == "unit")
        for u in self.units:
            action = u.action + ("+shared" if u.shared_folded and u.num_experts else "")
            table.add_row(
                short_unit_name(u.name),
                str(u.num_experts),
                action,
                num(u.dominance, ".3f"),
                num(u.entropy, ".3f"),
                num(u.error_predicted),
                num(u.error_measured),
            )
        console.print(table)
        routed = [u for u in self.units if u.num_experts]
        folded = [u for u in self.merged if u.num_experts]
        console.print(
            f"folded {len(folded)} of {len(routed)} routed units, predicted Σε = {self.predicted_total:.3g}",
            highlight=False,
        )
        if self.heldout_tokens:
            console.print(
                f"held-out ({self.heldout_source}, {self.heldout_tokens} tokens): logits rel. error "
                f"{num(self.logits_rel_error)}, top-1 agreement {num(self.top1_agreement, '.4f')}",
                highlight=False,
            )
        for notice in self.notices:
            console.print(f"note: {notice}", highlight=False)


@dataclass
class MergeResult:
    """The merged reference + remaining adapter (`loaded`), the plan, the report and the adapter before the merge."""

    loaded: LoadedAdapter
    plan: MergePlan
    report: MergeReport
    source_adapter: Adapter
    stats: CalibrationStats | None = None


def _needs_stats(adapter: Adapter, task_id: int | None) -> bool:
    return any(exact_expert_weights(u, adapter, task_id) is None for u in routed_linear_units(adapter).values())


def merge(
    loaded: LoadedAdapter,
    threshold: float | None = None,
    budget: float | None = None,
    stats: CalibrationStats | None = None,
    data: str | Path | None = None,
    progress: bool = True,
    *,
    samples: int = 32,
    seq_len: int = 64,
    seed: int = 0,
    evaluate: bool = True,
) -> MergeResult:
    """Plan and apply a merge (calibrating first when the plan needs statistics), then measure it on
    held-out calibration tokens. `loaded` is not changed (the merge works on a copy); `loaded.model` may be None when
    `stats` are given (or only exact folds are asked) and `evaluate=False`: then only the plan and the
    remaining adapter are produced, for `save_merged`."""
    check_options(threshold, budget)
    adapter = loaded.adapter
    if stats is None and (threshold is not None or budget is not None) and _needs_stats(adapter, loaded.task_id):
        stats = calibrate(loaded, data, samples, seq_len, seed, progress)
    if stats is not None:
        stats.check_matches(adapter)
    plan = plan_merge(adapter, stats, threshold, budget, loaded.task_id)
    measured: dict[str, float | None] = {}
    whole: dict[str, Any] = {}
    if evaluate:
        if loaded.model is None:
            raise MergeError(f"{loaded.checkpoint}: measuring a merge needs the reference model (or evaluate=False)")
        merged, measured, whole = _merge_and_measure(loaded, plan, data, samples, seq_len, seed, progress)
    else:
        merged = apply_merge_plan(loaded, plan)
    report = _report(adapter, plan, stats, measured, whole)
    return MergeResult(merged, plan, report, adapter, stats)


def _merge_and_measure(
    loaded: LoadedAdapter,
    plan: MergePlan,
    data: str | Path | None,
    samples: int,
    seq_len: int,
    seed: int,
    progress: bool,
) -> tuple[LoadedAdapter, dict[str, float | None], dict[str, Any]]:
    """Run the reference on the held-out split (recording the folded units), merge (a copy), run again."""
    inputs, source = calibration_inputs(loaded, data, samples, seq_len, seed, split="heldout")
    units = routed_linear_units(loaded.adapter)
    folded = {e.name: e for e in plan.units if e.expert_weights and e.name in units}
    accumulators = {n: UnitAccumulator(units[n].experts) for n in folded}  # type: ignore[arg-type]
    reference: list[torch.Tensor] = []
    with recording(loaded.model, accumulators):
        run_samples(loaded.model, inputs, progress, "held-out: reference", lambda _i, lg: reference.append(lg.float()))
    merged = apply_merge_plan(loaded, plan)
    sums = {"diff": 0.0, "ref": 0.0, "agree": 0, "tokens": 0}

    def compare(i: int, logits: torch.Tensor) -> None:
        ref, got = reference[i].double(), logits.double()  # [1, L, V]
        sums["diff"] += float((got - ref).pow(2).sum())
        sums["ref"] += float(ref.pow(2).sum())
        sums["agree"] += int((got.argmax(-1) == ref.argmax(-1)).sum())
        sums["tokens"] += ref.shape[0] * ref.shape[1]
        reference[i] = ref[:0]  # free as we go

    run_samples(merged.model, inputs, progress, "held-out: merged", compare)
    measured = {
        n: acc.to_stats(n, units[n].router.slots).error_for(folded[n].expert_weights)  # type: ignore[arg-type,union-attr]
        for n, acc in accumulators.items()
    }
    whole = {
        "logits_rel_error": math.sqrt(sums["diff"] / sums["ref"]) if sums["ref"] > 0 else None,
        "top1_agreement": sums["agree"] / sums["tokens"] if sums["tokens"] else None,
        "heldout_tokens": sums["tokens"],
        "heldout_source": source,
    }
    return merged, measured, whole


def _report(
    adapter: Adapter,
    plan: MergePlan,
    stats: CalibrationStats | None,
    measured: dict[str, float | None],
    whole: dict[str, Any],
) -> MergeReport:
    entries: dict[str, UnitMerge] = {e.name: e for e in plan.units}
    rows = []
    for unit in adapter.units:
        if not isinstance(unit, LinearMoE):
            rows.append(UnitReport(unit.name, unit.router.num_experts, "skipped"))
            continue
        entry = entries.get(unit.name)
        s = stats.units.get(unit.name) if stats is not None else None
        num_experts = unit.experts.num_experts if unit.experts is not None else 0
        row = UnitReport(unit.name, num_experts, "routed", shared_folded=bool(entry and entry.fold_shared))
        if s is not None:
            row.dominance, row.entropy, row.error_predicted = s.dominance, s.entropy, s.error
        if entry is not None and entry.becomes_linear:
            row.action = entry.reason
            row.dominance = entry.dominance if entry.dominance is not None else row.dominance
            row.error_predicted = entry.error_predicted
            row.error_measured = measured.get(unit.name)
        rows.append(row)
    return MergeReport(rows, threshold=plan.threshold, budget=plan.budget, notices=list(plan.notices), **whole)
