"""`moe-export merge CKPT -o OUT`: fold exact and dominant experts into the base weights (HF model dir)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from moe_export.cli import checks, options
from moe_export.cli.app import command, console, err_console, parse_int_list, print_json, report_console, shell_command


@command("merge")
def merge_cmd(
    ckpt: Path = options.CKPT_ARGUMENT,
    out: Path = typer.Option(..., "-o", "--output", help="New directory for the merged transformers model."),
    base: Path | None = options.BASE_OPTION,
    family: str | None = options.FAMILY_OPTION,
    top_k: str | None = options.TOP_K_OPTION,
    task_id: int | None = typer.Option(None, "--task-id", help="Task id (task-gated MOELoRA): folds exactly."),
    threshold: float | None = options.MERGE_THRESHOLD_OPTION,
    budget: float | None = options.MERGE_BUDGET_OPTION,
    stats_path: Path | None = typer.Option(
        None, "--stats", help="Statistics from `moe-export calibrate` (else run it)."
    ),
    data: Path | None = options.DATA_OPTION,
    samples: int = options.MERGE_SAMPLES_OPTION,
    seq_len: int = options.SEQ_LEN_OPTION,
    seed: int = options.SEED_OPTION,
    no_eval: bool = typer.Option(
        False, "--no-eval", help="Skip the held-out measurement; with --stats the reference model is never built."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the merge report as JSON on stdout."),
    device: str = options.DEVICE_OPTION,
    forward: str = options.MERGE_FORWARD_OPTION,
) -> None:
    """Write OUT: a transformers model with exact folds and selected units merged, plus OUT/adapter (the rest).

    Exact folds: shared LoRAs, E=1, a fixed task id, constant routers. Calibration and the held-out check run
    the reference one decoder layer at a time by default (--forward); the merged weights stream shard by shard.
    """
    from moe_export.merging import merge, save_merged
    from moe_export.merging.options import CalibrateOptions, MergeOptions
    from moe_export.merging.statistics import fewer_samples_notice
    from moe_export.merging.write import check_merge_output

    calibration = CalibrateOptions(data, samples, seq_len, seed, device, forward, progress=not as_json)
    merge_options = MergeOptions(threshold, budget, stats_path, evaluate=not no_eval, calibration=calibration)
    k = parse_int_list(top_k, "--top-k")
    checks.top_k_values(k)
    checks.input_dir(ckpt, "checkpoint")
    check_merge_output(out, [ckpt, base, stats_path, data])
    if not merge_options.selects:
        err_console.print("note: no --merge-threshold/--merge-budget: only exact folds are merged", highlight=False)
    result = merge(ckpt, merge_options, base_model=base, family=family, top_k=k, task_id=task_id)
    save_merged(result, out, progress=not as_json)
    calibrated = result.stats is not None and merge_options.stats is None
    notice = fewer_samples_notice(result.stats, samples) if calibrated else None
    if notice:
        err_console.print(f"note: {notice}", highlight=False, markup=False)
    if as_json:
        print_json({"output": str(out), "plan": result.plan.to_dict(), "report": result.report.to_dict()})
        return
    _render(result, out)


def _render(result: Any, out: Path) -> None:
    """The merge report, what was written, and what to run next."""
    result.report.render(report_console())
    left = len(result.loaded.adapter.units)
    console.print(
        f"wrote {out}" + (f" (+ {left} routed unit(s) in {out / 'adapter'})" if left else ""),
        highlight=False,
        markup=False,
    )
    if left:
        onnx_out = out.parent / f"{out.name}-onnx"
        suggestion = (
            f"{shell_command('moe-export', 'onnx', out / 'adapter', '-o', onnx_out)}   (export what stays routed)"
        )
    else:
        suggestion = (
            f"AutoModelForCausalLM.from_pretrained({str(out)!r})   (a plain transformers model: nothing stays routed)"
        )
    console.print(f"next: {suggestion}", highlight=False, markup=False)
