"""`moe-export bench` on a tiny export: JSON + PNG, floor ratios, the latency gate, bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.validation.bench import Latency
from tests.artifacts import shared_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    return shared_export(tmp_path_factory, tiny_base)


def test_latency_statistics() -> None:
    lat = Latency.from_seconds([0.001 * i for i in range(1, 101)], tokens=50)
    assert lat.p50_ms == pytest.approx(50.5) and lat.p90_ms == pytest.approx(90.1) and lat.min_ms == pytest.approx(1)
    assert lat.tokens_per_s == pytest.approx(50 / 0.0505)


def test_bench_writes_json_and_png(export_dir: Path, tmp_path: Path) -> None:
    report, plot = tmp_path / "bench.json", tmp_path / "plots" / "latency.png"
    # The export itself stands in for the floor: a second (base-only) export would cost ~20 s of test time.
    args = ["bench", str(export_dir), "--batch", "1,2", "--seq", "8", "--warmup", "1", "--iters", "3"]
    args += ["--base", str(export_dir), "--threads", "1", "--report", str(report), "--plot", str(plot)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    rows = data["results"]
    assert [(r["runtime"], r["batch"], r["seq"]) for r in rows] == [("onnxruntime", 1, 8), ("onnxruntime", 2, 8)]
    for r in rows:
        lat = r["latency"]
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        assert lat["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / (lat["p50_ms"] / 1e3))
        assert r["ratio_p50_vs_floor"] == pytest.approx(lat["p50_ms"] / r["floor"]["p50_ms"])
    assert any("not a base-only export" in n for n in data["notes"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert not list(plot.parent.glob(".*"))  # no temporary left behind
    assert "vs floor" in result.output
    assert f"wrote {plot}" in result.stdout and f"wrote {report}" in result.stdout  # where the files went


def test_plot_axis_holds_every_whisker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 24: the y axis was scaled to the bars only, so a slow p90 run's whisker was cut off by the frame."""
    from matplotlib.figure import Figure

    from moe_export.validation.bench import BenchReport, BenchRow, plot_bench

    figures: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    slow = Latency(p50_ms=10.0, p90_ms=40.0, p99_ms=45.0, mean_ms=12.0, min_ms=9.0, tokens_per_s=100.0)
    floor = Latency(p50_ms=8.0, p90_ms=9.0, p99_ms=9.5, mean_ms=8.2, min_ms=7.9, tokens_per_s=125.0)
    report = BenchReport("x", "y", "fp32", {"iters": 10, "warmup": 1}, [BenchRow("onnxruntime", 1, 8, slow, floor)])
    plot_bench(report, tmp_path / "p.png")
    (axis,) = [ax for ax in figures[0].axes if ax.has_data()]
    assert axis.get_ylim()[1] >= slow.p90_ms  # the whole whisker is inside the frame


def test_bench_json_and_latency_gate(export_dir: Path) -> None:
    args = ["bench", str(export_dir), "--batch", "1", "--seq", "4", "--warmup", "0", "--iters", "2", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["floor"] is None
    # A ratio of at most 0 is impossible: the gate must fail with exit 1.
    result = CliRunner().invoke(app, [*args, "--base", str(export_dir), "--max-ratio", "0"])
    assert result.exit_code == 1 and "latency gate" in result.output


@pytest.mark.parametrize(
    "extra",
    [["--batch", "0"], ["--batch", "a,b"], ["--iters", "0"], ["--runtimes", "nope"], ["--max-ratio", "2"]],
)
def test_bench_bad_options_exit_2(export_dir: Path, extra: list[str]) -> None:
    result = CliRunner().invoke(app, ["bench", str(export_dir), "--seq", "4", "--iters", "1", *extra])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_bench_missing_artifact_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not found" in result.output


def test_latency_gate_is_in_the_library(export_dir: Path) -> None:
    """The Python API gets the gate the CLI has: `passed` and `check()` on the report."""
    from moe_export.errors import MoeExportError, ParityError
    from moe_export.validation.bench import bench

    common = {"batches": [1], "seq": 4, "warmup": 0, "iters": 1}
    with pytest.raises(MoeExportError, match="needs --base"):
        bench(export_dir, max_ratio=2.0, **common)
    report = bench(export_dir, base_dir=export_dir, max_ratio=0.0, **common)
    assert not report.passed and report.over_gate() == report.rows
    with pytest.raises(ParityError, match="latency gate") as info:
        report.check()
    assert info.value.report is report
    ungated = bench(export_dir, base_dir=export_dir, **common)
    assert ungated.passed and ungated.over_gate() == []
    ungated.check()
