"""`moe-export trt ONNX_DIR`: build a TensorRT engine (plugin or function-body path) from an ONNX export."""

from __future__ import annotations

from pathlib import Path

import typer

from moe_export.cli.app import command, console, err_console, print_json


@command("trt")
def trt_command(
    onnx_dir: Path = typer.Argument(
        ..., metavar="ONNX_DIR", help="Directory written by `moe-export onnx` (export.json + model.onnx)."
    ),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output directory (default: ONNX_DIR)."),
    plugin: str = typer.Option("auto", "--plugin", help="auto|on|off: GroupedLoRA as Triton AOT plugin or body."),
    min_shapes: str | None = typer.Option(None, "--min-shapes", help="e.g. input_ids:1x1,attention_mask:1x1"),
    opt_shapes: str | None = typer.Option(None, "--opt-shapes", help="e.g. input_ids:1x128,attention_mask:1x128"),
    max_shapes: str | None = typer.Option(None, "--max-shapes", help="e.g. input_ids:8x512,attention_mask:8x512"),
    workspace: float | None = typer.Option(None, "--workspace", help="Builder workspace limit in GiB."),
    timing_cache: Path | None = typer.Option(None, "--timing-cache", help="Timing cache file (read, then updated)."),
    tf32: bool = typer.Option(False, "--tf32", help="Allow TF32 in fp32 matmuls (faster, ~1e-3 relative error)."),
    as_json: bool = typer.Option(False, "--json", help="Print engine.json on stdout."),
) -> None:
    """Build OUT/model.engine + OUT/engine.json with TensorRT (strongly typed; needs a CUDA GPU)."""
    from moe_export.export.tensorrt import TrtBuildOptions, build_engine, parse_shapes
    from moe_export.runtimes.trt_engine import median_ms

    options = TrtBuildOptions(
        plugin=plugin,
        min_shapes=parse_shapes(min_shapes, "--min-shapes"),
        opt_shapes=parse_shapes(opt_shapes, "--opt-shapes"),
        max_shapes=parse_shapes(max_shapes, "--max-shapes"),
        workspace_gib=workspace,
        timing_cache=str(timing_cache) if timing_cache else None,
        tf32=tf32,
    )
    with err_console.status("building TensorRT engine(s)", spinner="dots"):
        report = build_engine(onnx_dir, out, options, time_engine=median_ms)
    if as_json:
        print_json(report)
        return
    target = out or onnx_dir
    console.print(
        f"[green]engine[/]: {target / report['engine']}  ({report['gpu']}, TensorRT {report['tensorrt_version']})"
    )
    console.print(f"path: {'plugin' if report['plugin'] == 'on' else 'function body'} — {report['reason']}")
    console.print(f"build: {', '.join(f'{k} {v:.1f}s' for k, v in report['build_seconds'].items())}")
