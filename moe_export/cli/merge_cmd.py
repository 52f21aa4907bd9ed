"""`moe-export merge CKPT -o OUT`: fold exact and dominant experts into the base weights (HF model dir)."""

from __future__ import annotations

from pathlib import Path

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
    from moe_export.errors import MergeError
    from moe_export.files import check_not_input, check_writable
    from moe_export.merging.apply import merge, save_merged
    from moe_export.merging.layerwise import check_forward, choose_streaming
    from moe_export.merging.plan import check_options
    from moe_export.merging.statistics import CalibrationStats, fewer_samples_notice
    from moe_export.reference.loading import attach_model, load_without_model

    check_options(threshold, budget)
    checks.at_least(samples, 1, "--samples")
    checks.at_least(seq_len, 1, "--seq-len")
    k = parse_int_list(top_k, "--top-k")
    checks.top_k_values(k)
    checks.input_dir(ckpt, "checkpoint")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # an empty one (a mount point) is fine
        raise MergeError(f"-o {out}: already exists; pass a new -o directory or remove it first")
    check_writable(out, "-o", directory=True)
    check_not_input(out, "-o", [ckpt, base, stats_path, data], directory=True)
    if data is not None and not data.is_file():
        raise MergeError(f"--data {data}: calibration text file not found")
    check_forward(forward, device)
    stats = CalibrationStats.load(stats_path) if stats_path is not None else None
    needs_model = not no_eval or (stats is None and (threshold is not None or budget is not None))
    loaded = load_without_model(ckpt, base, family, k, task_id)
    streaming = choose_streaming(forward, device, loaded.base_model_path)
    if needs_model and streaming is None:
        loaded = attach_model(loaded)
    if threshold is None and budget is None:
        err_console.print("note: no --merge-threshold/--merge-budget: only exact folds are merged", highlight=False)
    result = merge(
        loaded,
        threshold,
        budget,
        stats,
        data,
        not as_json,
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        evaluate=not no_eval,
        streaming=streaming,
    )
    save_merged(result, out, progress=not as_json)
    notice = fewer_samples_notice(result.stats, samples) if result.stats is not None and stats is None else None
    if notice:
        err_console.print(f"note: {notice}", highlight=False, markup=False)
    if as_json:
        print_json({"output": str(out), "plan": result.plan.to_dict(), "report": result.report.to_dict()})
        return
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
