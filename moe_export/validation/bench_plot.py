"""A PNG of a bench report: a panel per (runtime, input shape), the adapter's p50 bar beside the floor's.

Each panel has its own y scale so a 0.5 ms bar stays readable next to a 400 ms one; the ratio to the
floor is the panel's headline. Whiskers reach p90.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moe_export.errors import MoeExportError

if TYPE_CHECKING:
    from moe_export.validation.bench import BenchReport

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
                continue
            bars = [("adapter", row.latency, ADAPTER_COLOR, None)]
            if row.floor is not None:
                bars.append(("base floor", row.floor, FLOOR_COLOR, "//"))
            top = 0.0
            for x, (_label, lat, color, hatch) in enumerate(bars):
                ax.bar(x, lat.p50_ms, 0.6, color=color, hatch=hatch, edgecolor="#505050")
                ax.errorbar(x, lat.p50_ms, yerr=[[0], [lat.p90_ms - lat.p50_ms]], color="#404040", capsize=3, lw=1)
                ax.annotate(_ms(lat.p50_ms), (x, lat.p50_ms), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=9)  # fmt: skip
                top = max(top, lat.p50_ms)
            ax.set_xticks(range(len(bars)), [b[0] for b in bars])
            ax.set_xlim(-0.6, len(bars) - 0.4)
            # Scale to the bars, not the whiskers: one p90 outlier on a busy machine would flatten them.
            ax.set_ylim(0, top * 1.35 if top > 0 else 1.0)
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
            headline = f"{runtime} · {shape.replace('x', ' × ')}"
            if row.ratio is not None:
                headline += f"\n{row.ratio:.2f}× floor"
            ax.set_title(headline, fontsize=10, fontweight="bold" if row.ratio is not None else "normal")
            if s_index == 0:
                ax.set_ylabel("p50 latency, ms\n(whisker: p90)", fontsize=9)
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


def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"
