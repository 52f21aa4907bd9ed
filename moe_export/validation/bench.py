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

from moe_export.errors import MoeExportError
from moe_export.runtimes.base import Feeds, Runner
from moe_export.runtimes.kv import complete_feeds
from moe_export.runtimes.registry import Artifact, RunnerOptions, make_runner
from moe_export.validation.feeds import random_feeds
from moe_export.validation.report import write_text_atomic

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
        return {
            "artifact": self.artifact,
            "base": self.base,
            "dtype": self.dtype,
            "settings": self.settings,
            "results": [r.to_dict() for r in self.rows],
            "notes": self.notes,
        }

    def write_json(self, path: str | Path) -> Path:
        return write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def plot(self, path: str | Path) -> Path:
        from moe_export.validation.bench_plot import plot_bench

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
) -> BenchReport:
    """Benchmark an export (and optionally its base-only floor) on each runtime and batch size."""
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
         "threads": options.threads, "device": options.device},
    )  # fmt: skip
    if base is not None and not base.base_only:
        report.notes.append(f"{base.path} is not a base-only export (export.json base_only is false)")
    if base is not None and base.dtype != artifact.dtype:
        report.notes.append(f"floor dtype {base.dtype} differs from the export's {artifact.dtype}")
    feeds = {b: complete_feeds(random_feeds(b, seq, artifact.vocab_size(), seed), artifact.manifest) for b in batches}
    names = set(artifact.input_names())
    feeds = {b: {k: v for k, v in f.items() if k in names} for b, f in feeds.items()}

    def run_all(target: Artifact, runtime: str) -> dict[int, Latency]:
        with make_runner(runtime, target, options) as runner:
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
