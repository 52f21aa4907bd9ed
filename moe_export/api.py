"""The Python API functions that span stages: export, then validate (what `moe-export onnx` runs).

The export stage never calls validation itself (a stage imports only earlier ones); this module sits after
both, so `moe_export.export_onnx` and the CLI run the same sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from moe_export.errors import ExportError, ParityError
from moe_export.export.onnx import ExportResult
from moe_export.export.onnx import export_onnx as _export_only
from moe_export.reference.loading import LoadedAdapter


def export_onnx(
    loaded: LoadedAdapter,
    out_dir: str | Path,
    *,
    validate: bool = True,
    console: Console | None = None,
    max_top1_drop: float | None = None,
    **options: Any,
) -> ExportResult:
    """`export.onnx.export_onnx(loaded, out_dir, **options)`, then (unless `validate=False`) the parity gate.

    A failed gate raises ParityError (exit 1) with the report; the export stays on disk for inspection.
    `max_top1_drop` gates a quantized export's cost (validation/quantized.py); it is reported either way.
    A KV-cache export ships the native kernel library when it is built or can be built here (unless
    MOE_EXPORT_KERNELS=off), so onnxruntime-genai runs the native kernels from the export folder as it is.
    """
    check_validation_possible(options.get("dtype", "fp32"), validate)
    console = console or Console(stderr=True)
    if options.get("kv_cache", True) and not options.get("base_only") and "kernel_library" not in options:
        from moe_export.runtimes.native import session_library  # lazy: a later stage's file, located here

        options["kernel_library"] = session_library()[0]
    result = _export_only(loaded, out_dir, console=console, **options)
    if validate:
        result.validation = validate_export(result.out_dir, console, max_top1_drop)
    return result


def check_validation_possible(dtype: str, validate: bool) -> None:
    """Refuse, before any work, an export whose parity check cannot run: onnxruntime has no bfloat16 kernels
    for the exported graph on the CPU, so a bf16 export with validation would be written and then fail (exit 2)
    with the export left behind."""
    if validate and dtype == "bf16":
        raise ExportError(
            "--dtype bf16: onnxruntime cannot run a bf16 export on the CPU, so its parity cannot be checked; "
            "pass --no-validate to export it without the check"
        )


def validate_export(out_dir: Path, console: Console, max_top1_drop: float | None = None) -> Any:
    """Parity against the PyTorch reference (validation/); ParityError (exit 1) when it fails."""
    from moe_export.validation import validate  # lazy: pulls in onnxruntime

    report = validate(out_dir, max_top1_drop=max_top1_drop)
    report.render(console)
    if not report.passed:
        raise ParityError(f"{out_dir}: ONNX parity check against the PyTorch reference failed", report)
    return report
