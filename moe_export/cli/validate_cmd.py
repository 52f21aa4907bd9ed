"""`moe-export validate ARTIFACT_DIR`: parity of an export against the PyTorch reference, with CI exit codes.

Exit 0: every output and unit within tolerance; 1: a parity gate failed (the table names the diverging
output and unit); 2: bad input (missing directory, no export.json, a model that does not load).
"""

from __future__ import annotations

from pathlib import Path

import typer

from moe_export.cli import checks
from moe_export.cli.app import command, err_console, finish_report
from moe_export.errors import MoeExportError


def parse_runtimes(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise MoeExportError("--runtimes: empty value; e.g. --runtimes torch,onnxruntime")
    return names


RUNTIMES_OPTION = typer.Option(
    "torch,onnxruntime",
    "--runtimes",
    help="Comma-separated; the first is the reference (torch, onnxruntime, onnxruntime-body: the function bodies without the native kernels, tensorrt).",
)
RTOL_OPTION = typer.Option(
    None,
    "--rtol",
    help="Tolerance relative to max|reference| per output (default: fp32 1e-4, fp16 1e-2, bf16 5e-2).",
)
MAX_TOP1_DROP_OPTION = typer.Option(
    None,
    "--max-top1-drop",
    help="Quantized exports: fail when more than this fraction of held-out positions change argmax against "
    "the fp32 reference (the quantization's cost; reported, not gated, without it).",
)
SAVE_RESULTS_OPTION = typer.Option(
    None,
    "--save-results",
    help="Also write each candidate's run (outputs, unit taps, generation) to DIR/<runtime>/.",
)
LOAD_RESULTS_OPTION = typer.Option(
    None, "--load-results", help="Judge candidate runs saved by --save-results in DIR instead of running them."
)
OPTIMIZATION_OPTION = typer.Option(
    None,
    "--optimization",
    help="ONNX Runtime graph optimisation of the candidate sessions: disable, basic, extended or all. Default: "
    "basic for an fp16 export on the CPU, all otherwise: on the CPU, all stores an fp16 export's weights "
    "converted to fp32 (twice its size, ONNX Runtime 1.32), while basic keeps them fp16 and casts per op (a 1.1B "
    "fp16 export: 3.2 GB peak instead of 5.3 GB).",
)
REFERENCE_OPTION = typer.Option(
    "streamed",
    "--reference",
    help="How the torch reference runs: streamed (one decoder layer's weights in memory at a time, after the "
    "candidates have freed theirs) or whole (the whole model in memory; also used where streaming cannot run: "
    "quantized or merge-plan exports, bases without safetensors).",
)
NEW_TOKENS_OPTION = typer.Option(
    16, "--new-tokens", help="Greedy tokens compared per prompt on a KV-cache export (0: skip generation)."
)


@command("validate")
def validate_command(
    artifact_dir: Path = typer.Argument(
        ..., metavar="ARTIFACT_DIR", help="Export directory (model.onnx + export.json)."
    ),
    runtimes: str = RUNTIMES_OPTION,
    inputs: Path | None = typer.Option(None, "--inputs", help=".npz with input_ids [B,S] (and attention_mask)."),
    batch: int | None = typer.Option(
        None, "--batch", help="Random inputs of this batch size (default shapes 1x7, 3x33)."
    ),
    seq: int | None = typer.Option(None, "--seq", help="Random inputs of this sequence length."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random token ids."),
    atol: float | None = typer.Option(None, "--atol", help="Absolute tolerance (default by export dtype)."),
    rtol: float | None = RTOL_OPTION,
    min_top1: float | None = typer.Option(None, "--min-top1", help="Also require this top-1 token agreement."),
    max_top1_drop: float | None = MAX_TOP1_DROP_OPTION,
    new_tokens: int = NEW_TOKENS_OPTION,
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads for every runtime."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    report_path: Path | None = typer.Option(None, "--report", help="Write the full report as JSON."),
    junit_path: Path | None = typer.Option(None, "--junit", help="Write JUnit XML for CI test reporters."),
    ckpt: Path | None = typer.Option(
        None, "--ckpt", help="Source checkpoint directory (default: the one export.json records)."
    ),
    base: Path | None = typer.Option(None, "--base", help="Base model directory (default: from export.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    save_results: Path | None = SAVE_RESULTS_OPTION,
    load_results: Path | None = LOAD_RESULTS_OPTION,
    optimization: str | None = OPTIMIZATION_OPTION,
    reference: str = REFERENCE_OPTION,
) -> None:
    """Compare an export with the PyTorch reference: per-output errors, routing agreement per unit."""
    from moe_export.validation.options import ValidateOptions
    from moe_export.validation.validate_artifact import validate

    # ValidateOptions checks every value (one line naming the flag) before anything loads.
    settings = ValidateOptions(
        runtimes=tuple(parse_runtimes(runtimes)), inputs=inputs, batch=batch, seq=seq, seed=seed, atol=atol, rtol=rtol,
        min_top1=min_top1, max_top1_drop=max_top1_drop, new_tokens=new_tokens, threads=threads, device=device,
        checkpoint=ckpt, base_model=base, reference=reference, optimization=optimization,
    )  # fmt: skip
    checks.input_dir(artifact_dir, "export directory")
    checks.writable_files((report_path, "--report"), (junit_path, "--junit"))
    if load_results is not None:
        checks.input_dir(load_results, "--load-results directory")
    checks.outputs_apart([(report_path, "--report"), (junit_path, "--junit")], [artifact_dir, inputs, ckpt, base])
    status = err_console.status("validating", spinner="dots")
    with status:
        report = validate(
            artifact_dir,
            settings,
            progress=lambda message: status.update(message),
            save_results=save_results,
            load_results=load_results,
        )
    finish_report(report, as_json, [(report_path, report.write_json), (junit_path, report.write_junit)])
