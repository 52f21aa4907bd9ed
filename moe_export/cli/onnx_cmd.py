"""`moe-export onnx CKPT`: export to ONNX with the moe_export::GroupedLoRA custom op, then validate.

Exit 0: exported (and parity passed); 1: parity failed (the export stays, the table says why);
2: bad input (nothing is written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from moe_export.cli import checks
from moe_export.cli.app import command, console, err_console, parse_int_list, print_json, report_console, shell_command
from moe_export.cli.options import (
    BASE_OPTION,
    CKPT_ARGUMENT,
    DEVICE_OPTION,
    FAMILY_OPTION,
    MERGE_BUDGET_OPTION,
    MERGE_THRESHOLD_OPTION,
    ONNX_FORWARD_OPTION,
    TASK_ID_OPTION,
    TOP_K_OPTION,
)

NO_KV_CACHE_OPTION = typer.Option(
    False, "--no-kv-cache", help="Write the scoring graph (input_ids, attention_mask -> logits), no past/present."
)
FORCE_OPTION = typer.Option(
    False, "--force", help="Replace an export in -o that sits beside other files (only the export's files)."
)
QUANTIZE_OPTION = typer.Option(
    None,
    "--quantize",
    help="int4 or int8: base linears and lm_head become MatMulNBits (symmetric blocks, int8 activations on "
    "CPU); routers, experts and GroupedLoRA stay fp32. Needs --dtype fp32.",
)
MAX_TOP1_DROP_OPTION = typer.Option(
    None,
    "--max-top1-drop",
    help="With --quantize: fail (exit 1) when more than this fraction of held-out positions change argmax "
    "against the fp32 reference (reported, not gated, without it).",
)
FUSION_OPTION = typer.Option(
    "none",
    "--fusion",
    help="none: standard ops only; contrib: the KV-cache decoder's attention, rotary and residual norms as "
    "ONNX Runtime com.microsoft ops (GroupQueryAttention...; ONNX Runtime only: moe-export trt refuses it, "
    "hence not the default).",
)


@command("onnx")
def onnx_command(
    ckpt: Path = CKPT_ARGUMENT,
    base: Path | None = BASE_OPTION,
    out: Path | None = typer.Option(None, "-o", "--out", help="Output directory (default: ./<ckpt name>-onnx)."),
    family: str | None = FAMILY_OPTION,
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16 (routers stay fp32)."),
    opset: int = typer.Option(20, "--opset", help="Standard ONNX opset (>= 18)."),
    top_k: str | None = TOP_K_OPTION,
    task_id: int | None = TASK_ID_OPTION,
    base_only: bool = typer.Option(False, "--base-only", help="Export the base model without the adapter (the floor)."),
    merge_threshold: float | None = MERGE_THRESHOLD_OPTION,
    merge_budget: float | None = MERGE_BUDGET_OPTION,
    data: Path | None = typer.Option(None, "--data", help="Calibration text file (one sample per line) for merging."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the parity check against PyTorch."),
    no_kv_cache: bool = NO_KV_CACHE_OPTION,
    force: bool = FORCE_OPTION,
    quantize: str | None = QUANTIZE_OPTION,
    block_size: int = typer.Option(32, "--block-size", help="Weights per quantization scale along K (--quantize)."),
    max_top1_drop: float | None = MAX_TOP1_DROP_OPTION,
    fusion: str = FUSION_OPTION,
    no_adapter_fusion: bool = typer.Option(
        False,
        "--no-adapter-fusion",
        help="Keep each routed linear's router (MatMul, Softmax, TopK...), GroupedLoRA and residual Add as "
        "separate nodes instead of one RoutedGroupedLoRAAdd node.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (on stdout)."),
    device: str = DEVICE_OPTION,
    forward: str = ONNX_FORWARD_OPTION,
) -> None:
    """Export a checkpoint to OUT/model.onnx + export.json (+ config, tokenizer) and check parity.

    With a merge option, --device/--forward say how its calibration runs: auto uses the fp32 model the export
    holds anyway when on the CPU, and streams layer by layer on a GPU."""
    from moe_export.api import export_onnx
    from moe_export.export.options import ExportOptions, merge_from_flags

    merge = merge_from_flags(merge_threshold, merge_budget, data, device=device, forward=forward, progress=not as_json)
    options = ExportOptions(
        dtype=dtype, opset=opset, kv_cache=not no_kv_cache, base_only=base_only, merge=merge, quantize=quantize,
        block_size=block_size, validate=not no_validate, max_top1_drop=max_top1_drop, force=force,
        progress=not as_json, fusion=fusion, adapter_fusion=not no_adapter_fusion,
    )  # fmt: skip
    k = parse_int_list(top_k, "--top-k")
    checks.top_k_values(k)
    checks.input_dir(ckpt, "checkpoint")
    out = out if out is not None else Path.cwd() / f"{ckpt.resolve().name}-onnx"
    console_ = err_console if as_json else report_console()  # --json: stdout holds the JSON alone
    result = export_onnx(ckpt, out, options, console=console_, base_model=base, family=family, top_k=k, task_id=task_id)
    if as_json:
        print_json(result.to_dict())
        return
    _render(result)


def _render(result: Any) -> None:
    """What was exported, then the commands that come next."""
    routed = len(result.manifest.routed_units)
    console.print(
        f"[green]exported[/] {result.model_path} ({result.manifest.dtype}, opset {result.manifest.opset}, "
        f"{routed} GroupedLoRA units, {len(result.manifest.units) - routed} folded/merged) in {result.seconds:.1f} s",
        highlight=False,
    )
    where = result.out_dir
    console.print(
        f"next: {shell_command('moe-export', 'validate', where)}   (parity again, other inputs: --inputs/--batch/--seq; "
        "--junit for CI)\n"
        f"      {shell_command('moe-export', 'bench', where)}   (latency; --base DIR of a --base-only export for the floor)\n"
        f"      {shell_command('moe-export', 'trt', where)}   (TensorRT engine, on a machine with an NVIDIA GPU)",
        highlight=False,
        markup=False,
    )
