"""The Python API functions that span stages: export, then validate (what `moe-export onnx` runs).

The export stage never calls validation itself (a stage imports only earlier ones); this module sits after
both, so `moe_export.export_onnx` and the CLI run the same sequence, with the same memory behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from moe_export.errors import ParityError
from moe_export.export.onnx import ExportResult, load_for_export, merge_streaming_for
from moe_export.export.onnx import export_onnx as _export_only
from moe_export.export.options import ExportOptions
from moe_export.merging.layerwise import check_forward
from moe_export.reference.loading import LoadedAdapter


def export_onnx(
    source: LoadedAdapter | str | Path,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    console: Console | None = None,
    base_model: str | Path | None = None,
    family: str | None = None,
    top_k: int | list[int] | None = None,
    task_id: int | None = None,
    consume: bool = False,
    **fields: Any,
) -> ExportResult:
    """Export a checkpoint to ONNX, then (unless `validate=False`) the parity gate; see ExportOptions for the
    options (or give its fields as keywords).

    `source` is a checkpoint directory (with the load options base_model, family, top_k, task_id) or a
    LoadedAdapter. A directory is loaded the way `moe-export onnx` loads it: in the export dtype when the base
    is stored in it, and handed over to the export, so the process holds one copy of the weights. A
    LoadedAdapter is left as it is (its weights are copied where the export changes them) unless `consume=True`.
    A merge's calibration streams layer by layer or runs the model at hand as `merge.calibration` says.
    A KV-cache export ships the native kernel library when it is built or can be built here (unless
    MOE_EXPORT_KERNELS=off), so onnxruntime-genai runs the native kernels from the export folder as it is.
    A failed gate raises ParityError (exit 1) with the report; the export stays on disk for inspection.
    """
    options = ExportOptions.build(options, fields)  # every option checked here, before any work
    console = console or Console(stderr=True)
    if isinstance(source, LoadedAdapter):
        from moe_export.reference.loading import open_source

        loaded = open_source(source, base_model, family, top_k, task_id)  # refuses load options here
    else:
        if options.merge is not None:
            check_forward(options.merge.calibration.forward, options.merge.calibration.device)
        loaded = load_for_export(source, out_dir, options, base_model, family, top_k, task_id)  # checks -o first
        consume = True  # nobody else holds this model
    streaming = merge_streaming_for(loaded, options)
    library = None
    if options.kv_cache and not options.base_only:
        from moe_export.runtimes.native import session_library  # lazy: a later stage's file, located here

        library = session_library()[0]
    result = _export_only(
        loaded, out_dir, options, console=console, consume=consume, merge_streaming=streaming, kernel_library=library
    )
    if options.validate:
        result.validation = validate_export(result.out_dir, console, options.max_top1_drop)
    return result


def validate_export(out_dir: Path, console: Console, max_top1_drop: float | None = None) -> Any:
    """Parity against the PyTorch reference (validation/); ParityError (exit 1) when it fails.
    `max_top1_drop` gates a quantized export's cost (validation/quantized.py); it is reported either way."""
    from moe_export.validation import validate  # lazy: pulls in onnxruntime

    report = validate(out_dir, max_top1_drop=max_top1_drop)
    report.render(console)
    if not report.passed:
        raise ParityError(f"{out_dir}: ONNX parity check against the PyTorch reference failed", report)
    return report
