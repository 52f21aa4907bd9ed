"""`moe-export triton EXPORT_DIR -o REPO`: a Triton Inference Server model repository from an export.

Exit 0: written; 2: bad input (not an export, options the export cannot satisfy), nothing written.
"""

from __future__ import annotations

from pathlib import Path

import typer

from moe_export.cli.app import command, console, print_json, shell_command


@command("triton")
def triton_command(
    export_dir: Path = typer.Argument(
        ..., metavar="EXPORT_DIR", help="Directory written by `moe-export onnx` (export.json + model.onnx)."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Model repository folder to write (new, or an earlier one)."),
    name: str | None = typer.Option(None, "--name", help="Model name (default: the export folder's name)."),
    max_batch_size: int | None = typer.Option(
        None, "--max-batch-size", help="Dynamic batching up to B (default 8; 0 for a KV-cache decoder: required)."
    ),
    instances: int = typer.Option(1, "--instances", help="Model instances (instance_group count) per model."),
    device: str = typer.Option("cpu", "--device", help="cpu|gpu: instance kind (gpu also serves a TensorRT engine)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime|python: backend of the export's model."),
    threads: int = typer.Option(0, "--threads", help="ORT intra-op threads per instance (0: ORT's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Write a Triton model repository: the export's graph, a generation model for KV-cache exports, the engine."""
    from moe_export.export.manifest import Artifact
    from moe_export.files import check_not_input
    from moe_export.serving.repository import TritonOptions, write_repository

    Artifact.open(export_dir)  # "not an export" says more than "-o inside it": checked first
    check_not_input(out, "-o", [export_dir], directory=True)
    options = TritonOptions(name, max_batch_size, instances, device, backend, threads)
    report = write_repository(export_dir, out, options)
    if as_json:
        print_json(report.to_dict())
        return
    console.print(f"[green]repository[/]: {report.repository}", highlight=False, soft_wrap=True)
    for model, info in report.models.items():
        console.print(f"  {model}: {info['backend']} — {info['role']}", highlight=False, markup=False)
    for note in report.notes:
        console.print(f"  note: {note}", highlight=False, markup=False)
    command_line = shell_command("tritonserver", "--model-repository", report.repository)
    console.print(f"serve: {command_line}", highlight=False, soft_wrap=True, markup=False)
    console.print(f"  needs the Triton backends: {', '.join(report.backends)}", highlight=False, markup=False)
    if "onnxruntime" in report.backends:
        console.print(
            "  (a server without the onnxruntime backend, such as nvidia-pytriton's, needs --backend python)",
            highlight=False,
            markup=False,
        )
