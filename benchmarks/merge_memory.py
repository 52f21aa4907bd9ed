"""Peak memory of `moe-export merge` on a 7B-shaped model (few layers), streamed shard by shard.

Generates in a scratch directory (default /tmp/moe-export-merge-bench, never committed):
  base/   Llama, hidden 4096, intermediate 11008, 4 layers, vocab 8000, bf16, one ~400 MB shard per layer
  ckpt/   canonical adapter: E=8, r=16, top-2 routers on all 7 projections of every layer, + a shared LoRA
  stats.json  synthetic calibration statistics (mean gates; a few units dominated by one expert)
then runs, each in its own subprocess, with peak RSS and CPU time from getrusage(RUSAGE_CHILDREN):
  1. the import floor (python + torch + transformers + moe_export.merging),
  2. `moe-export merge --stats stats.json --no-eval` (the streaming writer alone, no reference model),
  3. with --calibrate: `moe-export calibrate` and `moe-export merge --merge-threshold` (calibration, held-out
     check and writer), both layer-streamed (the default --forward): one decoder layer's bf16 weights at a time;
     --whole adds `calibrate --forward whole` (the fp32 model in memory) for comparison.

    python benchmarks/merge_memory.py [--dir D] [--calibrate [--whole]] [--samples N --seq-len L] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import measure

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, HEADS, KV_HEADS = 4096, 11008, 4, 8000, 32, 32
EXPERTS, RANK, TOP_K = 8, 16, 2
PROJECTIONS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}


def make_base(directory: Path) -> None:
    """Random bf16 weights shard by shard (one decoder layer per shard) without building the model."""
    from big_model import Shape  # benchmarks/ is sys.path[0] when this runs as a script
    from big_model import make_base as write_base

    # Positional, in big_model.Shape's field order (hidden, layers, intermediate, heads, kv_heads, vocab, E, r, k).
    write_base(directory, Shape(HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS, VOCAB, EXPERTS, RANK, TOP_K))


def make_adapter_and_stats(ckpt: Path, base: Path, stats_path: Path) -> None:
    import torch

    from moe_export.ir import Adapter, ExpertStack, LinearMoE, Router, SharedLoRA
    from moe_export.merging.statistics import CalibrationStats, UnitStats

    g = torch.Generator().manual_seed(1)
    units, stats = [], {}
    for layer in range(LAYERS):
        for proj, (d_in, d_out) in PROJECTIONS.items():
            name = f"model.layers.{layer}.{proj}"
            stack = ExpertStack(
                torch.randn(EXPERTS, RANK, d_in, generator=g) * 0.01,
                torch.randn(EXPERTS, d_out, RANK, generator=g) * 0.01,
                torch.full((EXPERTS,), 2.0),
            )
            router = Router(
                "linear", EXPERTS, "topk", TOP_K, renormalize=True, weight=torch.randn(EXPERTS, d_in, generator=g)
            )
            shared = [
                SharedLoRA(torch.randn(8, d_in, generator=g) * 0.01, torch.randn(d_out, 8, generator=g) * 0.01, 1.0)
            ]
            units.append(LinearMoE(name, d_in, d_out, stack, router, shared))
            # Synthetic statistics: every third unit dominated by one expert, so a threshold merges a third.
            dominant = 0.98 if len(units) % 3 == 0 else 0.3
            gate = torch.full((EXPERTS,), (1.0 - dominant) / (EXPERTS - 1))
            gate[0] = dominant
            zeros = [[0.0] * EXPERTS for _ in range(EXPERTS)]
            moments = {"p": zeros, "q": [0.0] * EXPERTS, "r": zeros, "base_sq": 1.0}
            stats[name] = UnitStats(name, EXPERTS, TOP_K, 1, gate.tolist(), [1.0] * EXPERTS, 0.1, moments)
    adapter = Adapter("canonical", units, base_model=str(base))
    adapter.save(ckpt)
    calib = CalibrationStats(str(ckpt), "canonical", "synthetic", 0, 0, 0, 0, stats)
    calib.save(stats_path)


def calibration_runs(cli: list[str], ckpt: Path, root: Path, args: argparse.Namespace) -> dict[str, object]:
    """--calibrate: layer-streamed `calibrate`, `merge` with its own calibration (and `calibrate --forward whole`
    with --whole), each measured in its own process."""
    figures: dict[str, object] = {}
    tokens = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    runs = {"calibrate": [*cli, "calibrate", str(ckpt), "-o", str(root / "calib.json"), *tokens]}
    merged_calibrated = root / "merged-calibrated"
    shutil.rmtree(merged_calibrated, ignore_errors=True)
    runs["merge_calibrated"] = [
        *cli, "merge", str(ckpt), "--merge-threshold", "0.5", "-o", str(merged_calibrated), *tokens
    ]  # fmt: skip
    if args.whole:
        runs["calibrate_whole"] = [*runs["calibrate"], "--forward", "whole", "-o", str(root / "calib-whole.json")]
    for name, command in runs.items():
        run = measure(command)
        assert run["rc"] == 0, f"{name} failed: {' '.join(command)}"
        figures.update(
            {
                f"{name}_peak_rss_mib": run["peak_rss_mib"],
                f"{name}_seconds": run["wall_s"],
                f"{name}_cpu_seconds": run["cpu_s"],
            }
        )
    figures["calibration_tokens"] = json.loads((root / "calib.json").read_text())["tokens"]
    shutil.rmtree(merged_calibrated, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-export-merge-bench"))
    parser.add_argument(
        "--calibrate", action="store_true", help="also measure layer-streamed `calibrate` and `merge` with calibration"
    )
    parser.add_argument("--whole", action="store_true", help="with --calibrate: also `calibrate --forward whole`")
    parser.add_argument("--samples", type=int, default=4, help="calibration (and held-out) samples")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sample")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    root: Path = args.dir
    base, ckpt, stats = root / "base", root / "ckpt", root / "stats.json"
    if not (base / "model.safetensors.index.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        make_base(base)
        make_adapter_and_stats(ckpt, base, stats)
        print(f"generated {root} in {time.perf_counter() - t:.0f} s")
    shards = sorted(base.glob("*.safetensors"))
    shard_mib = [p.stat().st_size / 2**20 for p in shards]
    total = sum(shard_mib)
    cli = [shutil.which("moe-export") or "moe-export"]
    figures: dict[str, object] = {"shards": len(shards), "largest_shard_mib": max(shard_mib), "total_mib": total}
    floor = [sys.executable, "-c", "import torch, transformers, moe_export.merging, moe_export.cli"]
    figures["import_floor_mib"] = measure(floor)["peak_rss_mib"]
    out = root / "merged"
    shutil.rmtree(out, ignore_errors=True)
    merge_cmd = [
        *cli,
        "merge",
        str(ckpt),
        "--merge-threshold",
        "0.9",
        "--stats",
        str(stats),
        "--no-eval",
        "-o",
        str(out),
    ]
    run = measure(merge_cmd)
    assert run["rc"] == 0, "moe-export merge failed"
    merged = json.loads((out / "moe_export_merge.json").read_text())["plan"]
    figures.update(
        merge_peak_rss_mib=run["peak_rss_mib"],
        merge_seconds=run["wall_s"],
        merged_units=sum(1 for u in merged["units"] if u["expert_weights"]),
        shared_folds=sum(1 for u in merged["units"] if u["fold_shared"]),
    )
    if args.calibrate:
        figures.update(calibration_runs(cli, ckpt, root, args))
    for key, value in figures.items():
        print(f"{key:>24}: {value:.1f}" if isinstance(value, float) else f"{key:>24}: {value}")
    for name in ("merge", "calibrate", "merge_calibrated", "calibrate_whole"):
        if f"{name}_peak_rss_mib" in figures:
            rss = float(figures[f"{name}_peak_rss_mib"])  # type: ignore[arg-type]
            print(f"{name} peak RSS = {rss / max(shard_mib):.2f} x largest shard, {rss / total:.2f} x model size")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
