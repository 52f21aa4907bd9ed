"""`moe_export.validation.bench`: latency per runtime and shape, side by side with the base-only export (the floor).

Each (runtime, batch) runs `warmup` untimed inferences, then `iters` timed ones (the runner's own
`last_inference_time`, which excludes feed preparation). We report p50/p90/p99 and mean latency and
tokens/s = batch * seq / p50. With a base-only export (`base_dir`), the same runtime and shapes run on it
and `ratio = p50(adapter) / p50(floor)` is the adapter's cost.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from moe_export.errors import MoeExportError, ParityError
from moe_export.export.manifest import Artifact
from moe_export.files import write_text_atomic
from moe_export.runtimes.base import Feeds, Runner
from moe_export.runtimes.registry import RunnerOptions, make_runner
from moe_export.validation.feeds import random_feeds

Advance = Callable[[int], None]


@dataclass
class Latency:
    """Latency statistics of one runtime on one input shape."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    tokens_per_s: float

    @classmethod
    def from_seconds(cls, seconds: Sequence[float], tokens: int) -> Latency:
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(p50, p90, p99, float(ms.mean()), float(ms.min()), tokens / (p50 / 1e3))


@dataclass
class BenchRow:
    """One (runtime, batch, seq): the adapter export, and the floor when a base-only export was given."""

    runtime: str
    batch: int
    seq: int
    latency: Latency
    floor: Latency | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.floor is None else self.latency.p50_ms / self.floor.p50_ms

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.seq}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio_p50_vs_floor"] = self.ratio
        return d


@dataclass
class BenchReport:
    artifact: str
    base: str | None
    dtype: str
    settings: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"] = [r.to_dict() for r in self.rows]  # with each row's ratio to the floor
        return {"results" if key == "rows" else key: value for key, value in data.items()}

    def over_gate(self) -> list[BenchRow]:
        """Rows whose p50 exceeds the latency gate (settings["max_ratio"] times the floor); [] without a gate."""
        limit = self.settings.get("max_ratio")
        return [] if limit is None else [r for r in self.rows if r.ratio is not None and r.ratio > limit]

    @property
    def passed(self) -> bool:
        return not self.over_gate()

    def check(self) -> None:
        """Raise ParityError (exit 1) when the latency gate failed."""
        slow = self.over_gate()
        if slow:
            worst = max(slow, key=lambda r: r.ratio or 0.0)
            raise ParityError(
                f"latency gate: {worst.runtime} {worst.shape} p50 is {worst.ratio:.2f}x the floor "
                f"(> {self.settings['max_ratio']}x); {len(slow)} of {len(self.rows)} rows over",
                self,
            )

    def write_json(self, path: str | Path) -> Path:
        return write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def plot(self, path: str | Path) -> Path:
        return plot_bench(self, Path(path))

    def render(self, console: Console) -> None:
        title = f"Latency ({self.dtype}, {self.settings['iters']} iters after {self.settings['warmup']} warm-up)"
        table = Table(title=title)
        for column in ("runtime", "shape", "p50 ms", "p90 ms", "p99 ms", "tokens/s"):
            table.add_column(column, justify="left" if column in ("runtime", "shape") else "right")
        if self.base:
            table.add_column("floor p50 ms", justify="right")
            table.add_column("vs floor", justify="right")
        for r in self.rows:
            lat = r.latency
            cells = [r.runtime, r.shape, f"{lat.p50_ms:.3f}", f"{lat.p90_ms:.3f}", f"{lat.p99_ms:.3f}"]
            cells.append(f"{lat.tokens_per_s:,.0f}")
            if self.base:
                cells += ["", ""] if r.floor is None else [f"{r.floor.p50_ms:.3f}", f"{r.ratio:.2f}x"]
            table.add_row(*cells)
        console.print(table)
        for note in self.notes:
            console.print(f"[dim]note: {note}[/]")


def time_runner(runner: Runner, feeds: Feeds, warmup: int, iters: int, advance: Advance | None = None) -> list[float]:
    """Seconds of `iters` timed inferences after `warmup` untimed ones (runner already active)."""
    tick = advance or (lambda _n: None)
    for _ in range(warmup):
        runner.infer(feeds)
        tick(1)
    seconds = []
    for _ in range(iters):
        runner.infer(feeds)
        seconds.append(runner.last_inference_time())
        tick(1)
    return seconds


def bench(
    artifact_dir: str | Path,
    runtimes: Sequence[str] = ("onnxruntime",),
    batches: Sequence[int] = (1, 8),
    seq: int = 128,
    warmup: int = 3,
    iters: int = 10,
    base_dir: str | Path | None = None,
    options: RunnerOptions | None = None,
    seed: int = 0,
    advance: Advance | None = None,
    max_ratio: float | None = None,
) -> BenchReport:
    """Benchmark an export (and optionally its base-only floor) on each runtime and batch size.

    `max_ratio`: the latency gate, p50 at most this multiple of the floor (needs `base_dir`); the report's
    `passed` says whether it held and `check()` raises ParityError (exit 1) when it did not."""
    if max_ratio is not None and base_dir is None:
        raise MoeExportError("--max-ratio needs --base (a base-only export to compare with)")
    if warmup < 0 or iters < 1:
        raise MoeExportError(f"--warmup {warmup} --iters {iters}: need warmup >= 0 and iters >= 1")
    if not batches or min(batches) < 1 or seq < 1:
        raise MoeExportError(f"--batch {list(batches)} --seq {seq}: sizes must be >= 1")
    artifact = Artifact.open(artifact_dir)
    base = Artifact.open(base_dir) if base_dir is not None else None
    options = options or RunnerOptions()
    report = BenchReport(
        str(artifact.path),
        None if base is None else str(base.path),
        artifact.dtype,
        {"runtimes": list(runtimes), "batches": list(batches), "seq": seq, "warmup": warmup, "iters": iters,
         "threads": options.threads, "device": options.device, "max_ratio": max_ratio},
    )  # fmt: skip
    if base is not None and not base.base_only:
        report.notes.append(f"{base.path} is not a base-only export (export.json base_only is false)")
    if base is not None and base.dtype != artifact.dtype:
        report.notes.append(f"floor dtype {base.dtype} differs from the export's {artifact.dtype}")
    interface = artifact.interface
    vocab = artifact.vocab_size()
    feeds = {
        b: interface.select(interface.complete_feeds(random_feeds(interface, b, seq, vocab, seed))) for b in batches
    }

    def run_all(target: Artifact, runtime: str) -> dict[int, Latency]:
        with make_runner(runtime, target, options) as runner:
            if target is artifact and getattr(runner, "kernel_note", ""):  # native kernels or function bodies
                report.notes.append(f"{runtime}: {runner.kernel_note}")  # type: ignore[attr-defined]
            return {
                b: Latency.from_seconds(time_runner(runner, feeds[b], warmup, iters, advance), b * seq) for b in batches
            }

    for runtime in runtimes:
        adapter = run_all(artifact, runtime)
        floor = run_all(base, runtime) if base is not None else {}
        report.rows += [BenchRow(runtime, b, seq, adapter[b], floor.get(b)) for b in batches]
    return report


def total_steps(runtimes: Sequence[str], batches: Sequence[int], warmup: int, iters: int, with_floor: bool) -> int:
    """Inferences `bench` will run (for a progress bar)."""
    return len(runtimes) * len(batches) * (warmup + iters) * (2 if with_floor else 1)


# A PNG of a bench report: a panel per (runtime, input shape), the adapter's p50 bar beside the floor's.
#
# Each panel has its own y scale so a 0.5 ms bar stays readable next to a 400 ms one; the ratio to the
# floor is the panel's headline. Whiskers reach p90.
ADAPTER_COLOR = "#1f77b4"
FLOOR_COLOR = "#c8c8c8"


def plot_bench(report: BenchReport, path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MoeExportError(f"--plot needs matplotlib ({exc}); pip install 'moe-export[plot]'") from None
    if not report.rows:
        raise MoeExportError("bench report has no results to plot")

    shapes = list(dict.fromkeys(r.shape for r in report.rows))
    runtimes = list(dict.fromkeys(r.runtime for r in report.rows))
    fig, axes = plt.subplots(
        len(runtimes), len(shapes), figsize=(1.2 + 3.0 * len(shapes), 0.8 + 2.9 * len(runtimes)), squeeze=False
    )
    for r_index, runtime in enumerate(runtimes):
        for s_index, shape in enumerate(shapes):
            ax = axes[r_index][s_index]
            row = next((r for r in report.rows if r.runtime == runtime and r.shape == shape), None)
            if row is None:
                ax.set_axis_off()
            else:
                _plot_panel(ax, row, runtime, shape, first_column=s_index == 0)
    threads = report.settings.get("threads")
    fig.suptitle(
        f"moe-export bench: {Path(report.artifact).name} ({report.dtype}, {report.settings['iters']} iters"
        + (f", {threads} threads" if threads else "")
        + ", batch × seq)",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _plot_panel(ax: Any, row: BenchRow, runtime: str, shape: str, first_column: bool) -> None:
    """One runtime x shape panel: the adapter's p50 bar (and the base floor's) with p90 whiskers."""
    bars = [("adapter", row.latency, ADAPTER_COLOR, None)]
    if row.floor is not None:
        bars.append(("base floor", row.floor, FLOOR_COLOR, "//"))
    top = whisker = 0.0
    for x, (_label, lat, color, hatch) in enumerate(bars):
        ax.bar(x, lat.p50_ms, 0.6, color=color, hatch=hatch, edgecolor="#505050")
        ax.errorbar(x, lat.p50_ms, yerr=[[0], [lat.p90_ms - lat.p50_ms]], color="#404040", capsize=3, lw=1)
        ax.annotate(_ms(lat.p50_ms), (x, lat.p50_ms), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=9)  # fmt: skip
        top, whisker = max(top, lat.p50_ms), max(whisker, lat.p90_ms)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax.set_xlim(-0.6, len(bars) - 0.4)
    # Room for the p50 labels above the bars and for the whole p90 whisker: an axis that cuts a whisker
    # hides how far the slow runs went (a p90 outlier does make the bars smaller; that is the data).
    ax.set_ylim(0, max(top * 1.35, whisker * 1.08) if top > 0 else 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    headline = f"{runtime} · {shape.replace('x', ' × ')}"
    if row.ratio is not None:
        headline += f"\n{row.ratio:.2f}× floor"
    ax.set_title(headline, fontsize=10, fontweight="bold" if row.ratio is not None else "normal")
    if first_column:
        ax.set_ylabel("p50 latency, ms\n(whisker: p90)", fontsize=9)


def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"
