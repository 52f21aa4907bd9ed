"""CPU latency of the ONNX export against its floor and the PyTorch paths, in one run.

    python benchmarks/onnx_cpu.py --work /tmp/moebench [--batch 1,8] [--seq 128] [--threads 2] [--runs 7]

Variants (same bench checkpoint, see bench_model.py):
  base-only   ORT, the base model exported without adapter (the floor)
  moe-export  ORT, our export (GroupedLoRA nodes + function body, ORT inlines the body)
  dense       ORT, the plain dense decomposition inlined into the graph (the free baseline)
  torch-ref   PyTorch, our reference forward (grouped_lora custom op)
  torch-loop  PyTorch, the seeds' style: route, then a Python loop over experts on the tokens each got
Runs are interleaved round by round so load from other processes hits every variant alike; the table
shows medians and the ratio of each variant to base-only.
Legend: T tokens, E experts, K slots, R rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import moe_export
from moe_export.reference.model import MoELoRALinear, moe_modules
from moe_export.reference.routing import route_tokens


class SeedsStyleLinear(torch.nn.Module):
    """How the research code bases run a MoE-LoRA linear: route, then loop over experts."""

    def __init__(self, module: MoELoRALinear) -> None:
        super().__init__()
        self.base, self.router = module.base, module.router
        self.router_weight, self.router_bias = module.router_weight, module.router_bias
        self.expert_A, self.expert_B = module.expert_A, module.expert_B  # [E, R, D_in], [E, D_out, R] (scaled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        flat = x.reshape(-1, x.shape[-1])  # [T, D_in]
        ids, gates = route_tokens(self.router, flat, self.router_weight, self.router_bias)  # [T, K]
        out = torch.zeros(flat.shape[0], y.shape[-1], dtype=y.dtype)  # [T, D_out]
        for e in range(self.expert_B.shape[0]):
            tokens, slots = torch.where(ids == e)
            if tokens.numel() == 0:
                continue
            h = flat[tokens] @ self.expert_A[e].T  # [T_e, R]
            out.index_add_(0, tokens, (h @ self.expert_B[e].T) * gates[tokens, slots, None])
        return y + out.view(y.shape)


def fold_shared(loaded: moe_export.LoadedAdapter) -> torch.nn.Module:
    for name, module in moe_modules(loaded.model):
        if isinstance(module, MoELoRALinear) and module.shared_scalings:
            module.fold_shared_into_base(loaded.adapter.unit(name))  # type: ignore[arg-type]
    return loaded.model


def seeds_style(model: torch.nn.Module) -> torch.nn.Module:
    for _, module in list(moe_modules(model)):
        parent_name, _, child = module.unit_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, SeedsStyleLinear(module))
    return model


def inline_dense(moe_path: Path, out_path: Path) -> Path:
    """The export with its function bodies inlined: the same math as plain standard ops."""
    import onnx
    import onnx.inliner

    if not out_path.exists():
        model = onnx.inliner.inline_local_functions(onnx.load(str(moe_path)))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(out_path))
    return out_path


def ort_runner(path: Path, threads: int) -> Callable[[dict[str, np.ndarray]], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(["logits"], feeds)


def torch_runner(model: torch.nn.Module) -> Callable[[dict[str, np.ndarray]], object]:
    def run(feeds: dict[str, np.ndarray]) -> object:
        with torch.inference_mode():
            ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return run


def prepare(work: Path) -> dict[str, Path]:
    """Bench checkpoint + the two exports (made once, reused by later runs)."""
    ckpt = work / "model" / "ckpt"
    if not (ckpt / "manifest.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_model import write_bench_checkpoint

        write_bench_checkpoint(work / "model")
    paths = {"base-only": work / "base-onnx", "moe-export": work / "moe-onnx"}
    for name, out in paths.items():
        if not (out / "model.onnx").is_file():
            print(f"exporting {name} -> {out}", flush=True)
            moe_export.export_onnx(moe_export.load(ckpt), out, base_only=name == "base-only", validate=False)
    return {
        "ckpt": ckpt,
        "base-only": paths["base-only"] / "model.onnx",
        "moe-export": paths["moe-export"] / "model.onnx",
        "dense": inline_dense(paths["moe-export"] / "model.onnx", work / "dense-onnx" / "model.onnx"),
    }


def measure(
    runners: dict[str, Callable], feeds: dict[str, np.ndarray], runs: int, warmup: int
) -> dict[str, list[float]]:
    for run in runners.values():
        for _ in range(warmup):
            run(feeds)
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for i in range(runs):  # interleaved, rotating the order: load bursts and cache state hit every variant alike
        for name in names[i % len(names) :] + names[: i % len(names)]:
            run = runners[name]
            start = time.perf_counter()
            run(feeds)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/moebench"))
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="base-only,moe-export,dense,torch-ref,torch-loop")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = prepare(args.work)
    wanted = args.variants.split(",")
    runners: dict[str, Callable] = {}
    for name in wanted:
        if name in ("base-only", "moe-export", "dense"):
            runners[name] = ort_runner(paths[name], args.threads)
        elif name == "torch-ref":
            runners[name] = torch_runner(fold_shared(moe_export.load(paths["ckpt"])))
        elif name == "torch-loop":
            runners[name] = torch_runner(seeds_style(fold_shared(moe_export.load(paths["ckpt"]))))
    results = {}
    for batch in (int(b) for b in args.batch.split(",")):
        ids = np.random.default_rng(0).integers(0, 32000, (batch, args.seq))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        times = measure(runners, feeds, args.runs, args.warmup)
        med = {name: statistics.median(t) for name, t in times.items()}
        floor = med.get("base-only")
        print(f"\nbatch {batch} x seq {args.seq}, {args.threads} threads, median of {args.runs} interleaved runs")
        print(f"{'variant':12s} {'median ms':>10s} {'min ms':>8s} {'x base-only':>12s} {'tokens/s':>9s}")
        for name, t in times.items():
            ratio = f"{med[name] / floor:12.3f}" if floor else f"{'-':>12s}"
            print(f"{name:12s} {med[name] * 1e3:10.1f} {min(t) * 1e3:8.1f} {ratio} {batch * args.seq / med[name]:9.0f}")
        if "torch-loop" in med and "moe-export" in med:
            print(f"moe-export is {med['torch-loop'] / med['moe-export']:.2f}x faster than torch-loop")
        results[batch] = {name: {"median_s": med[name], "runs_s": t} for name, t in times.items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
