"""Calibration and the held-out merge measurement with the reference streamed one decoder layer at a time.

The same statistics as `statistics.calibrate` and `apply._merge_and_measure` (UnitAccumulator, fp64 sums;
LogitsAgreement), but the process holds one decoder layer's weights at a time (reference/streamed.py), in the
model's dtype, on `device`. The held-out measurement runs two hidden-state streams through each loaded layer:
the reference first (recording the units the plan folds), then, after the plan is folded into that layer in
place, the merged stream.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_export.formats.base_weights import INDEX_FILE, SINGLE_FILE
from moe_export.ir.fold import unmap_large_frees
from moe_export.merging.calibration_data import CalibrationSet, calibration_inputs
from moe_export.merging.logits_agreement import LogitsAgreement
from moe_export.merging.module_folds import check_plan, fold_entries
from moe_export.merging.options import check_forward_choice
from moe_export.merging.plan import MergePlan
from moe_export.merging.statistics import (
    CalibrationStats,
    UnitAccumulator,
    collect_stats,
    recording,
    routed_linear_units,
)
from moe_export.progress import progress_bar
from moe_export.reference.loading import require_task_id
from moe_export.reference.streamed import PARTS, StreamedReference, resolve_device

if TYPE_CHECKING:
    from moe_export.reference.loading import LoadedAdapter


@dataclasses.dataclass(frozen=True)
class Streaming:
    """How the layer-streamed reference runs: the torch device and the weights' dtype (None: the model's own)."""

    device: str = "cpu"
    dtype: torch.dtype | None = None


def check_forward(forward: str, device: str) -> str:
    """--forward and --device checked against this machine (before anything loads); returns the resolved device."""
    check_forward_choice(forward, device)
    resolved = str(resolve_device(device))
    check_forward_choice(forward, device, resolved)
    return resolved


def choose_streaming(forward: str, device: str, base_path: Path, whole_model_loaded: bool = False) -> Streaming | None:
    """--forward/--device -> the Streaming to use, or None for the whole-model reference (fp32, on the CPU).

    auto: layer by layer (never the whole model in memory, the model's dtype, and the same statistics as the
    whole model: tests/test_layerwise.py), except for a base without safetensors weights (streaming reads
    safetensors only) and when the caller holds the whole model anyway on the CPU (`onnx` exports it): running
    that model saves reading the weights again."""
    resolved = check_forward(forward, device)
    if forward == "whole":
        return None
    has_safetensors = (base_path / SINGLE_FILE).is_file() or (base_path / INDEX_FILE).is_file()
    if forward == "auto" and (not has_safetensors or (whole_model_loaded and resolved == "cpu")):
        return None
    return Streaming(device=resolved)


def _stream(loaded: LoadedAdapter, streaming: Streaming) -> StreamedReference:
    require_task_id(loaded.adapter, loaded.task_id, loaded.checkpoint)
    unmap_large_frees()  # freed layers and temporaries go back to the OS instead of staying in the heap
    return StreamedReference(loaded.base_model_path, loaded.adapter, loaded.task_id, streaming.dtype, streaming.device)


@torch.no_grad()
def calibrate_layerwise(
    loaded: LoadedAdapter,
    calib: CalibrationSet = CalibrationSet(),
    progress: bool = True,
    streaming: Streaming = Streaming(),
) -> CalibrationStats:
    """`statistics.calibrate` without the whole model in memory (`loaded.model` is not used; it may be None)."""
    stream = _stream(loaded, streaming)
    inputs, source = calibration_inputs(loaded, calib, split="stats", vocab=stream.vocab_size)
    units = routed_linear_units(loaded.adapter)
    accumulators: dict[str, UnitAccumulator] = {}
    states = stream.embed(inputs)
    steps = stream.num_layers * len(PARTS) * len(states)
    with progress_bar(progress, "calibrating (layer by layer)", steps) as advance:
        for i in range(stream.num_layers):
            # One layer's accumulators at a time: their fp64 copies of A are as big as the layer's experts.
            layer_accs = {
                u.name: UnitAccumulator(units[u.name].experts, stream.device)  # type: ignore[arg-type]
                for u in stream.units_by_layer[i]
                if u.name in units
            }
            for part in PARTS:
                with stream.part(i, part) as layer, recording(layer, layer_accs):
                    for state in states:
                        stream.run(layer, i, part, state)
                        advance()
            for acc in layer_accs.values():
                acc.drop_inputs()  # only the [E] / [E, E] sums are needed from here on
            accumulators.update(layer_accs)
    return collect_stats(loaded, accumulators, inputs, source, calib)


@torch.no_grad()
def measure_layerwise(
    loaded: LoadedAdapter,
    plan: MergePlan,
    calib: CalibrationSet = CalibrationSet(),
    progress: bool = True,
    streaming: Streaming = Streaming(),
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """`apply._merge_and_measure`'s figures (per-unit measured ε, whole-model logits agreement) streamed."""
    linear_units = check_plan(loaded.adapter, plan, loaded.checkpoint, loaded.task_id)
    stream = _stream(loaded, streaming)
    inputs, source = calibration_inputs(loaded, calib, split="heldout", vocab=stream.vocab_size)
    routed = routed_linear_units(loaded.adapter)
    folded = {e.name: e for e in plan.units if e.expert_weights and e.name in routed}
    reference = stream.embed(inputs)
    merged = [dataclasses.replace(state) for state in reference]  # same embeddings, own hidden state from here
    measured: dict[str, float | None] = {}
    steps = stream.num_layers * len(PARTS) * 2 * len(inputs)
    with progress_bar(progress, "held-out (layer by layer)", steps) as advance:
        for i in range(stream.num_layers):
            names = {u.name for u in stream.units_by_layer[i]}
            accs = {n: UnitAccumulator(routed[n].experts, stream.device) for n in folded if n in names}  # type: ignore[arg-type]
            for part in PARTS:
                in_part = {u.name for u in stream.part_units(i, part)}
                with stream.part(i, part) as layer:
                    with recording(layer, accs):
                        for state in reference:
                            stream.run(layer, i, part, state)
                            advance()
                    # The reference pass is done: fold this part's entries into its freshly loaded weights.
                    fold_entries(stream.model, [e for e in plan.units if e.name in in_part], linear_units)
                    for state in merged:
                        stream.run(layer, i, part, state)
                        advance()
            for n, acc in accs.items():
                stats = acc.to_stats(n, routed[n].router.slots)  # type: ignore[union-attr]
                measured[n] = stats.error_for(folded[n].expert_weights)  # type: ignore[arg-type]
    agreement = LogitsAgreement()
    with stream.head() as head:
        for ref, got in zip(reference, merged, strict=True):
            agreement.add(head(ref.hidden).float(), head(got.hidden).float())
    return measured, agreement.summary(source)
