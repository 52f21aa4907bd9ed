"""Merge: fold exact and dominant experts into the base weights, and report what it costs (docs/merging.md).

plan_merge(adapter, stats, ...)  -> MergePlan      (plan.py: pure data, JSON round trip)
apply_merge_plan(loaded, plan)   -> LoadedAdapter  (merged reference model + the adapter left routed)
merge(loaded, MergeOptions(...)) -> MergeResult    (calibrate if needed, plan, apply, held-out report)
save_merged(result, out_dir)     -> Path           (write.py: streaming HF model dir)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from moe_export.errors import MergeError
from moe_export.ir import Adapter, LinearMoE
from moe_export.merging.calibration_data import CalibrationSet, calibration_inputs
from moe_export.merging.layerwise import Streaming, calibrate_layerwise, measure_layerwise
from moe_export.merging.logits_agreement import LogitsAgreement
from moe_export.merging.module_folds import check_plan, fold_entries
from moe_export.merging.options import MergeOptions
from moe_export.merging.plan import (
    MergePlan,
    UnitMerge,
    exact_expert_weights,
    plan_merge,
)
from moe_export.merging.report import MergeReport, MergeResult, UnitReport
from moe_export.merging.statistics import (
    CalibrationStats,
    UnitAccumulator,
    calibrate_whole,
    recording,
    routed_linear_units,
    run_samples,
)
from moe_export.merging.write import save_merged
from moe_export.reference.model import MoELoRALinear
from moe_export.reference.model_copy import copy_for_edit

if TYPE_CHECKING:
    from moe_export.reference.loading import LoadedAdapter

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


@torch.no_grad()
def apply_merge_plan(loaded: LoadedAdapter, plan: MergePlan) -> LoadedAdapter:
    """Apply a plan to a copy of the reference model and return it with the adapter that stays routed;
    `loaded` is not changed. The copy shares every weight the plan does not touch (model_copy.py).
    Folded units become plain nn.Linear with W + Δ̄ (fp32 sum, cast once).
    The result depends on the plan only, so a plan read back from JSON rebuilds the same weights."""
    units = check_plan(loaded.adapter, plan, loaded.checkpoint, loaded.task_id)
    model = loaded.model
    if model is not None:
        modules = {e.name: model.get_submodule(e.name) for e in plan.units}
        wrong = [n for n, m in modules.items() if not isinstance(m, MoELoRALinear)]
        if wrong:
            raise MergeError(f"{loaded.checkpoint}: {wrong[0]} is not an adapter module in the model (merged twice?)")
        model = copy_for_edit(model, [m.base.weight for m in modules.values()])
        fold_entries(model, plan.units, units)
    return dataclasses.replace(loaded, adapter=remaining_adapter(loaded.adapter, plan), model=model)


def _needs_stats(adapter: Adapter, task_id: int | None) -> bool:
    return any(exact_expert_weights(u, adapter, task_id) is None for u in routed_linear_units(adapter).values())


def merge(
    loaded: LoadedAdapter,
    options: MergeOptions | None = None,
    stats: CalibrationStats | None = None,
    streaming: Streaming | None = None,
) -> MergeResult:
    """Plan and apply a merge as `options` say (calibrating first when the plan needs statistics and none are
    given, here or as `options.stats`), then, unless `options.evaluate` is off, measure it on held-out
    calibration tokens. `loaded` is not changed (the merge works on a copy); `loaded.model` may be None when
    statistics are given (or only exact folds are asked) and evaluate is off: then only the plan and the
    remaining adapter are produced, for `save_merged`. With `streaming`, calibration and the held-out measurement
    run the reference one decoder layer at a time (layerwise.py) and `loaded.model` may be None throughout.
    `moe_export.merge` (run.py) decides the streaming and the model for you."""
    options = options or MergeOptions()
    threshold, budget, evaluate = options.threshold, options.budget, options.evaluate
    calib, progress = CalibrationSet.from_options(options.calibration), options.calibration.progress
    if stats is None and options.stats is not None:
        stats = CalibrationStats.load(options.stats)
    adapter = loaded.adapter
    if stats is None and (threshold is not None or budget is not None) and _needs_stats(adapter, loaded.task_id):
        if streaming is not None:
            stats = calibrate_layerwise(loaded, calib, progress, streaming)
        else:
            stats = calibrate_whole(loaded, calib, progress)
    if stats is not None:
        stats.check_matches(adapter)
    plan = plan_merge(adapter, stats, threshold, budget, loaded.task_id)
    measured: dict[str, float | None] = {}
    whole: dict[str, Any] = {}
    if evaluate and streaming is not None:
        measured, whole = measure_layerwise(loaded, plan, calib, progress, streaming)
        merged = apply_merge_plan(loaded, plan)
    elif evaluate:
        if loaded.model is None:
            raise MergeError(f"{loaded.checkpoint}: measuring a merge needs the reference model (or evaluate=False)")
        merged, measured, whole = _merge_and_measure(loaded, plan, calib, progress)
    else:
        merged = apply_merge_plan(loaded, plan)
    report = _report(adapter, plan, stats, measured, whole)
    return MergeResult(merged, plan, report, adapter, stats)


def _merge_and_measure(
    loaded: LoadedAdapter, plan: MergePlan, calib: CalibrationSet, progress: bool
) -> tuple[LoadedAdapter, dict[str, float | None], dict[str, Any]]:
    """Run the reference on the held-out split (recording the folded units), merge (a copy), run again."""
    inputs, source = calibration_inputs(loaded, calib, split="heldout")
    units = routed_linear_units(loaded.adapter)
    folded = {e.name: e for e in plan.units if e.expert_weights and e.name in units}
    device = next(loaded.model.parameters()).device
    accumulators = {n: UnitAccumulator(units[n].experts, device) for n in folded}  # type: ignore[arg-type]
    reference: list[torch.Tensor] = []
    with recording(loaded.model, accumulators):
        run_samples(loaded.model, inputs, progress, "held-out: reference", lambda _i, lg: reference.append(lg.float()))
    merged = apply_merge_plan(loaded, plan)
    agreement = LogitsAgreement()

    def compare(i: int, logits: torch.Tensor) -> None:
        agreement.add(reference[i], logits)
        reference[i] = reference[i][:0]  # free as we go

    run_samples(merged.model, inputs, progress, "held-out: merged", compare)
    measured = {
        n: acc.to_stats(n, units[n].router.slots).error_for(folded[n].expert_weights)  # type: ignore[arg-type,union-attr]
        for n, acc in accumulators.items()
    }
    whole = agreement.summary(source)
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
