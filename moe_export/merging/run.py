"""The orchestrating API of calibration and merging: `moe_export.calibrate` and `moe_export.merge`.

Each takes a checkpoint directory or a LoadedAdapter and its options (CalibrateOptions / MergeOptions, or their
fields as keywords) and makes the decisions the CLI made before: whether the reference streams one decoder
layer at a time or runs the whole model (`forward`, `device`), and whether a whole model must be built. A
LoadedAdapter is never changed; its model, when it has one on the CPU, is run instead of reading the weights
again (forward auto), and one without a model is streamed or gets a model of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_export.merging import apply
from moe_export.merging.calibration_data import CalibrationSet
from moe_export.merging.layerwise import Streaming, calibrate_layerwise, check_forward, choose_streaming
from moe_export.merging.options import CalibrateOptions, MergeOptions
from moe_export.merging.report import MergeResult
from moe_export.merging.statistics import CalibrationStats, calibrate_whole
from moe_export.reference.loading import LoadedAdapter, attach_model, open_source

Source = LoadedAdapter | str | Path
LOAD_KEYS = ("base_model", "family", "top_k", "task_id")


def calibrate(source: Source, options: CalibrateOptions | None = None, **fields: Any) -> CalibrationStats:
    """Routing statistics of the reference on calibration text (see CalibrateOptions for `fields`; plus the
    load options base_model, family, top_k, task_id with a checkpoint path). Streams layer by layer unless the
    caller's model is at hand on the CPU (or `forward="whole"`)."""
    load = {k: fields.pop(k) for k in LOAD_KEYS if k in fields}
    options = _build(CalibrateOptions, options, fields)
    check_forward(options.forward, options.device)  # CUDA asked for and absent: refused before the load
    loaded = open_source(source, **load)
    streaming = _streaming(loaded, options)
    calib = CalibrationSet.from_options(options)
    if streaming is None:
        return calibrate_whole(_with_model(loaded), calib, options.progress)
    return calibrate_layerwise(loaded, calib, options.progress, streaming)


def merge(
    source: Source,
    options: MergeOptions | None = None,
    *,
    stats: CalibrationStats | None = None,
    streaming: Streaming | None = None,
    **fields: Any,
) -> MergeResult:
    """Plan and apply a merge, calibrating first when the plan needs statistics and measuring it unless
    `evaluate=False` (see MergeOptions; calibration fields such as samples= may be given flat). `stats` (or
    `options.stats`, a file) skips the calibration; `streaming` overrides the choice `forward`/`device` make."""
    load = {k: fields.pop(k) for k in LOAD_KEYS if k in fields}
    calibration_keys = set(CalibrateOptions.field_names()) & set(fields)
    if options is None and calibration_keys:
        fields["calibration"] = CalibrateOptions(**{k: fields.pop(k) for k in calibration_keys})
    options = _build(MergeOptions, options, fields)
    if streaming is None:
        check_forward(options.calibration.forward, options.calibration.device)  # before the load
    loaded = open_source(source, **load)
    if stats is None and options.stats is not None:
        stats = CalibrationStats.load(options.stats)  # before any model is built: a bad file costs no waiting
    streaming = streaming if streaming is not None else _streaming(loaded, options.calibration)
    needs_model = options.evaluate or (stats is None and options.selects)
    if needs_model and streaming is None:
        loaded = _with_model(loaded)
    return apply.merge(loaded, options, stats, streaming)


def _build(cls: Any, options: Any, fields: Mapping[str, Any]) -> Any:
    if options is not None and fields:
        raise TypeError(f"pass {cls.__name__} or keyword options, not both (got {sorted(fields)})")
    return options if options is not None else cls(**fields)


def _streaming(loaded: LoadedAdapter, options: CalibrateOptions) -> Streaming | None:
    on_hand = loaded.model is not None
    return choose_streaming(options.forward, options.device, loaded.base_model_path, whole_model_loaded=on_hand)


def _with_model(loaded: LoadedAdapter) -> LoadedAdapter:
    """`loaded` itself when it has its model, else a copy with the whole fp32 reference attached."""
    return loaded if loaded.model is not None else attach_model(loaded)
