"""GPU benchmark: TensorRT engines (base-only floor, MoE-LoRA plugin, MoE-LoRA function body) vs PyTorch eager.

    python benchmarks/trt_gpu.py WORK_DIR [--batch 1,8] [--seq 128] [--iterations 50] [--report trt_gpu.json]

WORK_DIR is reused between runs: the bench checkpoint (benchmarks/bench_model.py: Llama hidden 1024,
8 layers, E=8, r=8, top-2 on all 7 projections), the fp16 ONNX exports and the engines are made once.
Latency is device time per forward (CUDA events; inputs already on the GPU) at batch x seq tokens: the
first step (empty past) of the exports' KV-cache decoder, feeds and profile shapes from its graph interface.
Goal (issue 7): MoE-LoRA engine / base-only engine <= 1.10. Needs a CUDA GPU, tensorrt and triton.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import VOCAB, write_bench_checkpoint

import moe_export
from moe_export.export.interface import GraphInterface
from moe_export.export.manifest import Artifact
from moe_export.export.tensorrt import ENGINE_INFO_NAME, ENGINE_NAME, TrtBuildOptions, build_engine
from moe_export.reference.model import cast_reference_model
from moe_export.runtimes.tensorrt import TensorRTRunner
from moe_export.runtimes.trt_engine import median_ms

# Plugin last: the body engines are then built before the plugin is ever registered in this process.
ENGINES = {"base-only": ("onnx-base", "off"), "moe-body": ("onnx-moe", "off"), "moe-plugin": ("onnx-moe", "on")}


def _export(ckpt: Path, out: Path, base_only: bool) -> Path:
    if not (out / "export.json").is_file():
        start = time.perf_counter()
        loaded = moe_export.load(ckpt)
        moe_export.export_onnx(loaded, out, dtype="fp16", base_only=base_only, validate=False, progress=False)
        print(f"exported {out.name} in {time.perf_counter() - start:.0f}s", flush=True)
    return out


def _engine(work: Path, name: str, batches: list[int], seq: int) -> tuple[Path, dict[str, Any]]:
    onnx_dir, plugin = ENGINES[name]
    out = work / f"engine-{name}"
    if not (out / ENGINE_INFO_NAME).is_file():
        interface = Artifact.open(work / onnx_dir).interface
        shapes = interface.input_shapes(max(batches), seq)
        options = TrtBuildOptions(
            plugin=plugin,
            min_shapes=interface.input_shapes(1, 1),
            opt_shapes=shapes,
            max_shapes=shapes,
            timing_cache=str(work / "timing.cache"),
        )
        build_engine(work / onnx_dir, out, options, time_engine=median_ms)
    return out / ENGINE_NAME, json.loads((out / ENGINE_INFO_NAME).read_text())


def _feeds(interface: GraphInterface, batch: int, seq: int) -> dict[str, np.ndarray]:
    """A first step of the export's interface: random token ids, full mask (+ positions, empty past)."""
    ids = np.random.default_rng(batch).integers(0, VOCAB, size=(batch, seq), dtype=np.int64)
    return interface.complete_feeds({interface.tokens_name: ids})


def _torch_times(model: torch.nn.Module, feeds: dict[str, np.ndarray], warmup: int, iterations: int) -> list[float]:
    ids, mask = (
        torch.from_numpy(feeds[name]).cuda() for name in (GraphInterface.tokens_name, GraphInterface.mask_name)
    )
    times = []
    with torch.no_grad():
        for i in range(warmup + iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            end.record()
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end) / 1e3)
    return times


def _eager_model(ckpt: Path, base_only: bool) -> torch.nn.Module:
    loaded = moe_export.load(ckpt)
    if base_only:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(loaded.base_model_path, dtype=torch.float16).cuda().eval()
    return cast_reference_model(loaded.model, torch.float16).cuda().eval()


def _stats(times: list[float], tokens: int) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "tokens_per_s": tokens / (p50 / 1e3)}  # fmt: skip


def summarise(
    report: dict[str, Any], latency: dict[tuple[str, int], float], parity: dict[str, np.ndarray], batches: list[int],
    seq: int,
) -> None:  # fmt: skip
    """Ratios against the base-only engine, the plugin-vs-body logits difference and the goal, into `report`
    and printed as a table."""
    diff = float(np.abs(parity["moe-plugin"] - parity["moe-body"]).max())
    report["plugin_vs_body_max_abs_logit_diff"] = diff
    print(f"\n{report['gpu']}, seq {seq}, fp16; ratio = p50 / base-only engine p50 at the same batch")
    print(f"{'runtime':28} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'tokens/s':>11} {'ratio':>7}")
    for row in report["rows"]:
        row["ratio_vs_base_engine"] = row["p50_ms"] / latency[("base-only", row["batch"])]
        print(
            f"{row['runtime']:28} {row['batch']:>5} {row['p50_ms']:>9.3f} {row['p90_ms']:>9.3f} "
            f"{row['tokens_per_s']:>11.0f} {row['ratio_vs_base_engine']:>7.3f}"
        )
    best = {b: min(latency[("moe-plugin", b)], latency[("moe-body", b)]) / latency[("base-only", b)] for b in batches}
    report["goal"] = {"target_ratio": 1.10, "best_moe_engine_ratio": best, "met": all(r <= 1.10 for r in best.values())}
    print(f"\nplugin vs body max |logit diff| at batch 1: {diff:.4g}")
    print(f"goal MoE engine / base engine <= 1.10: {best} -> {'met' if report['goal']['met'] else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    work: Path = args.work_dir
    ckpt = work / "ckpt"
    if not (ckpt / "manifest.json").is_file():
        write_bench_checkpoint(work)
    _export(ckpt, work / "onnx-base", base_only=True)
    _export(ckpt, work / "onnx-moe", base_only=False)

    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "seq": args.seq, "engines": {}, "rows": []}
    latency: dict[tuple[str, int], float] = {}
    parity: dict[str, np.ndarray] = {}
    for name in ENGINES:
        engine, info = _engine(work, name, batches, args.seq)
        interface = Artifact.open(work / ENGINES[name][0]).interface
        report["engines"][name] = {
            k: info.get(k) for k in ("tensorrt_version", "plugin", "plugin_layers", "build_seconds")
        }
        with TensorRTRunner(engine) as runner:
            parity[name] = runner.infer(_feeds(interface, 1, args.seq))[interface.logits_name].astype(np.float32)
            for batch in batches:
                stats = _stats(
                    runner.time_execute(_feeds(interface, batch, args.seq), args.warmup, args.iterations),
                    batch * args.seq,
                )
                latency[(name, batch)] = stats["p50_ms"]
                report["rows"].append({"runtime": f"tensorrt {name}", "batch": batch, **stats})
    for name, base_only in (("torch-eager base-only", True), ("torch-eager moe", False)):
        model = _eager_model(ckpt, base_only)
        for batch in batches:
            feeds = _feeds(GraphInterface.scoring(), batch, args.seq)
            stats = _stats(_torch_times(model, feeds, args.warmup, args.iterations), batch * args.seq)
            latency[(name, batch)] = stats["p50_ms"]
            report["rows"].append({"runtime": name, "batch": batch, **stats})
        del model
        torch.cuda.empty_cache()

    summarise(report, latency, parity, batches, args.seq)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
