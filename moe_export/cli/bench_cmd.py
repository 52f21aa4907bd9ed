"""`moe-export bench ARTIFACT_DIR`: p50/p90/p99 latency and tokens/s per runtime and batch, vs the base-only floor."""

from __future__ import annotations

from pathlib import Path

import typer

from moe_export.cli import checks
from moe_export.cli.app import command, finish_report, parse_int_list
from moe_export.cli.validate_cmd import parse_runtimes


@command("bench")
def bench_command(
    artifact_dir: Path = typer.Argument(
        ..., metavar="ARTIFACT_DIR", help="Export directory (model.onnx + export.json)."
    ),
    runtimes: str = typer.Option(
        "onnxruntime", "--runtimes", help="Comma-separated: onnxruntime, onnxruntime-body, torch, tensorrt."
    ),
    batch: str = typer.Option("1,8", "--batch", help="Batch sizes, comma-separated."),
    seq: int = typer.Option(128, "--seq", help="Sequence length."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed runs before timing."),
    iters: int = typer.Option(10, "--iters", help="Timed runs per runtime and batch."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    base: Path | None = typer.Option(None, "--base", help="A base-only export of the same model: the floor."),
    max_ratio: float | None = typer.Option(
        None, "--max-ratio", help="Fail (exit 1) when p50 exceeds this multiple of the floor (needs --base)."
    ),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG bar chart (needs matplotlib)."),
    report_path: Path | None = typer.Option(None, "--report", help="Write the results as JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
) -> None:
    """Measure latency per runtime and batch size, side by side with the base model exported without adapters."""
    from moe_export.errors import MoeExportError
    from moe_export.runtimes.registry import RunnerOptions
    from moe_export.validation.bench import bench, total_steps

    batches = parse_int_list(batch, "--batch")
    batches = [batches] if isinstance(batches, int) else batches
    names = parse_runtimes(runtimes)
    _check_numbers(batches, seq, warmup, iters, threads, device, max_ratio)
    checks.input_dir(artifact_dir, "export directory")
    checks.writable_files((plot, "--plot"), (report_path, "--report"))
    checks.outputs_apart([(plot, "--plot"), (report_path, "--report")], [artifact_dir, base])
    if plot is not None:
        try:
            import matplotlib  # noqa: F401  checked before the slow part
        except ImportError:
            raise MoeExportError("--plot needs matplotlib; pip install 'moe-export[plot]'") from None
    from moe_export.progress import progress_bar

    with progress_bar(True, "bench", total_steps(names, batches, warmup, iters, base is not None)) as advance:
        report = bench(
            artifact_dir,
            runtimes=names,
            batches=batches,
            seq=seq,
            warmup=warmup,
            iters=iters,
            base_dir=base,
            options=RunnerOptions(device=device, threads=threads),
            advance=advance,
            max_ratio=max_ratio,
        )
    finish_report(report, as_json, [(report_path, report.write_json), (plot, report.plot)])


def _check_numbers(
    batches: list[int], seq: int, warmup: int, iters: int, threads: int | None, device: str, max_ratio: float | None
) -> None:
    """Every number and choice of `bench`, before anything loads."""
    for b in batches:
        checks.at_least(b, 1, "--batch")
    checks.at_least(seq, 1, "--seq")
    checks.at_least(warmup, 0, "--warmup")
    checks.at_least(iters, 1, "--iters")
    checks.at_least(threads, 1, "--threads")
    checks.one_of(device, ("cpu", "cuda"), "--device")
    checks.at_least(max_ratio, 0, "--max-ratio")
