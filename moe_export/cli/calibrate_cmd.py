"""`moe-export calibrate CKPT -o stats.json`: routing statistics of the reference on calibration text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from moe_export.cli import checks, options
from moe_export.cli.app import command, console, err_console, parse_int_list, print_json, report_console, shell_command


def render_stats(stats: Any) -> None:
    """A rich table of per-unit routing statistics."""
    from rich.table import Table

    table = Table(
        title=f"calibration: {stats.source}, {stats.samples} samples, {stats.tokens} tokens", title_justify="left"
    )
    for col in ("unit", "E", "K", "dominance", "entropy", "ε static", "‖Δx‖/‖Wx‖", "selection frequency"):
        table.add_column(
            col, justify="left" if col in ("unit", "selection frequency") else "right", no_wrap=col == "unit"
        )
    for u in stats.units.values():
        table.add_row(
            u.name,
            str(u.num_experts),
            str(u.slots),
            f"{u.dominance:.3f}",
            f"{u.entropy:.3f}",
            "-" if u.error is None else f"{u.error:.3g}",
            "-" if u.delta_rel is None else f"{u.delta_rel:.3g}",
            " ".join(f"{f:.2f}" for f in u.selection_frequency),
        )
    report_console(140).print(table, highlight=False)


@command("calibrate")
def calibrate_cmd(
    ckpt: Path = options.CKPT_ARGUMENT,
    out: Path = typer.Option(..., "-o", "--output", help="Where to write the statistics (JSON)."),
    base: Path | None = options.BASE_OPTION,
    family: str | None = options.FAMILY_OPTION,
    top_k: str | None = options.TOP_K_OPTION,
    task_id: int | None = options.TASK_ID_OPTION,
    data: Path | None = options.DATA_OPTION,
    samples: int = options.SAMPLES_OPTION,
    seq_len: int = options.SEQ_LEN_OPTION,
    seed: int = options.SEED_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON on stdout."),
    device: str = options.CALIBRATE_DEVICE_OPTION,
    forward: str = options.CALIBRATE_FORWARD_OPTION,
) -> None:
    """Run the reference over calibration text; record per unit and expert the mean gate, selection
    frequency, gate entropy and the error of a static (mean-gate) merge.

    By default (--forward auto = layers) the reference runs one decoder layer at a time in the model's dtype,
    so the process holds one layer's weights, not the model."""
    from moe_export.merging import calibrate
    from moe_export.merging.options import CalibrateOptions
    from moe_export.merging.statistics import fewer_samples_notice

    # checks --data, --samples, --seq-len, --forward and --device's spelling before anything loads
    calibration = CalibrateOptions(data, samples, seq_len, seed, device, forward, progress=not as_json)
    k = parse_int_list(top_k, "--top-k")
    checks.top_k_values(k)
    checks.input_dir(ckpt, "checkpoint")
    checks.writable_files((out, "-o"))
    checks.outputs_apart([(out, "-o")], [ckpt, base, data])
    stats = calibrate(ckpt, calibration, base_model=base, family=family, top_k=k, task_id=task_id)
    stats.save(out)
    notice = fewer_samples_notice(stats, samples)
    if notice:
        err_console.print(f"note: {notice}", highlight=False, markup=False)
    if as_json:
        print_json(stats.to_dict())
        return
    render_stats(stats)
    console.print(f"wrote {out}", highlight=False, markup=False)
    source = ["--base", base] if base is not None else []
    merged = Path(f"{ckpt.resolve().name}-merged")
    console.print(
        f"next: {shell_command('moe-export', 'merge', ckpt, *source, '--stats', out, '--merge-threshold', '0.9', '-o', merged)}"
        "   (fold the units whose dominance is >= 0.9; or --merge-budget B)",
        highlight=False,
        markup=False,
    )
