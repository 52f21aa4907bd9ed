"""CPU latency of the ONNX export against its floor and the PyTorch paths, in one run.

    python benchmarks/onnx_cpu.py --work /tmp/moebench [--batch 1,8] [--seq 128] [--threads 2] [--runs 7]

Variants (same bench checkpoint, see bench_model.py):
  base-only   ORT, the base model exported without adapter (the floor)
  moe-export  ORT, our export with --no-adapter-fusion (routers in standard ops, GroupedLoRA nodes + function
              body, ORT inlines the body; the default export's RoutedGroupedLoRAAdd is timed by decode_cpu.py)
  native      ORT, the same file with the native kernel library registered (moe_export/runtimes/native)
  native-add  ORT + library, the export after the fused-residual pass (GroupedLoRAAdd, export/onnx_fused.py)
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
from moe_export.export.manifest import ExportManifest
from moe_export.ops.names import GROUPED_LORA, GROUPED_LORA_ADD, OP_TYPES
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


def fused_add(moe_path: Path, out_path: Path) -> Path:
    """The export after the optional fused-residual pass."""
    import onnx

    from moe_export.export.onnx_fused import fuse_residual_add

    if not out_path.exists():
        model = onnx.load(str(moe_path))
        fuse_residual_add(model)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(out_path))
    return out_path


def ort_runner(path: Path | bytes, threads: int, native: bool = False) -> Callable[[dict[str, np.ndarray]], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if native:
        from moe_export.runtimes.native import build

        options.register_custom_ops_library(str(build()))
    if isinstance(path, bytes):
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return lambda feeds: session.run(None, feeds)
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
        # The scoring graph (input_ids, attention_mask -> logits) that these forwards feed: the KV-cache decoder,
        # `onnx`'s default, also wants position_ids and the past (benchmarks/decode_cpu.py times that one). A
        # work directory from before holds decoders: they are exported again.
        if not (out / "model.onnx").is_file() or _stale(ExportManifest.load(out)):
            print(f"exporting {name} -> {out}", flush=True)
            moe_export.export_onnx(
                moe_export.load(ckpt), out, base_only=name == "base-only", validate=False, kv_cache=False,
                adapter_fusion=False,
            )  # fmt: skip
    return {
        "ckpt": ckpt,
        "base-only": paths["base-only"] / "model.onnx",
        "moe-export": paths["moe-export"] / "model.onnx",
        "dense": inline_dense(paths["moe-export"] / "model.onnx", work / "dense-onnx" / "model.onnx"),
        "native": paths["moe-export"] / "model.onnx",
        "native-add": fused_add(paths["moe-export"] / "model.onnx", work / "fused-add-onnx" / "model.onnx"),
    }


def _stale(manifest: ExportManifest) -> bool:
    """A work directory's export made with other options than these variants need (a decoder, or the adapter
    passes, whose fused nodes the GroupedLoRA variants here would not see)."""
    return manifest.kv_cache or bool((manifest.adapter_fusion or {}).get("requested"))


# Wall time by default; --clock process measures this process's CPU time instead, which other tenants of a
# shared machine disturb far less (meaningful with --threads 1: ORT's pool threads spin while they wait).
CLOCK = [time.perf_counter]


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
            start = CLOCK[0]()
            run(feeds)
            times[name].append(CLOCK[0]() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/moebench"))
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="base-only,moe-export,native,native-add,dense,torch-ref,torch-loop")
    parser.add_argument("--layer-7b", action="store_true", help="instead: one projection at 7B dimensions")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall", help="what a run's time is")
    parser.add_argument("--profile", action="store_true", help="instead: ORT per-op time split of each ORT variant")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "process" else time.perf_counter
    if args.layer_7b:
        layer_7b(args)
        return
    paths = prepare(args.work)
    if args.profile:
        profile(paths, args)
        return
    wanted = args.variants.split(",")
    runners: dict[str, Callable] = {}
    for name in wanted:
        if name in ("base-only", "moe-export", "dense", "native", "native-add"):
            runners[name] = ort_runner(paths[name], args.threads, native=name.startswith("native"))
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
        print(
            f"\nbatch {batch} x seq {args.seq}, {args.threads} threads, {args.clock} time, median of {args.runs} runs"
        )
        print(f"{'variant':12s} {'median ms':>10s} {'min ms':>8s} {'x base-only':>12s} {'tokens/s':>9s}")
        for name, t in times.items():
            ratio = f"{med[name] / floor:12.3f}" if floor else f"{'-':>12s}"
            print(f"{name:12s} {med[name] * 1e3:10.1f} {min(t) * 1e3:8.1f} {ratio} {batch * args.seq / med[name]:9.0f}")
        for ours in ("moe-export", "native", "native-add"):
            if "torch-loop" in med and ours in med:
                print(f"{ours} is {med['torch-loop'] / med[ours]:.2f}x faster than torch-loop")
        results[batch] = {name: {"median_s": med[name], "runs_s": t} for name, t in times.items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def op_class(event: dict) -> str:
    """Profile bucket of one node: adapter kernel, router MatMul (to E = 8 logits) and TopK, or the op type."""
    op = event["args"]["op_name"]
    if op in (*OP_TYPES, GROUPED_LORA_ADD):
        return op
    if op == "MatMul":
        shapes = event["args"].get("output_type_shape", [{}])
        last = next(iter(shapes[0].values()), [0])[-1] if shapes else 0
        return "router MatMul" if last == 8 else "MatMul"
    return "router TopK" if op == "TopK" else op  # Softmax/Div/ReduceSum also serve attention and norms


def profile(paths: dict[str, Path], args: argparse.Namespace) -> None:
    """Where the time goes per variant: ms per op class (median run), from ORT's own profiler."""
    import onnxruntime as ort

    for batch in (int(b) for b in args.batch.split(",")):
        ids = np.random.default_rng(0).integers(0, 32000, (batch, args.seq))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        print(f"\nprofile batch {batch} x seq {args.seq}, {args.threads} threads (ms per run, sum over nodes)")
        for name in ("base-only", "moe-export", "native", "native-add"):
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            options.enable_profiling = True
            options.profile_file_prefix = str(args.work / f"profile-{name}-{batch}")
            if name.startswith("native"):
                from moe_export.runtimes.native import build

                options.register_custom_ops_library(str(build()))
            session = ort.InferenceSession(str(paths[name]), options, providers=["CPUExecutionProvider"])
            for _ in range(args.warmup + args.runs):
                session.run(["logits"], feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
            nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            buckets: dict[str, float] = {}
            for event in nodes:
                buckets[op_class(event)] = buckets.get(op_class(event), 0.0) + event["dur"] / 1e3
            runs = args.warmup + args.runs
            top = sorted(buckets.items(), key=lambda kv: -kv[1])[:9]
            print(f"{name:11s} " + "  ".join(f"{k} {v / runs:.1f}" for k, v in top))


def projection_model(d_in: int, d_out: int, experts: int, rank: int, top_k: int, adapter: bool) -> bytes:
    """One adapted projection as ONNX: base MatMul, softmax-top-k router, GroupedLoRA, Add (or the base alone)."""
    from onnx import TensorProto, helper, numpy_helper

    from moe_export.export.onnx_ops import grouped_lora_dense_body
    from moe_export.ops.names import DOMAIN, PLUGIN_ATTRIBUTES

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((d_in, d_out)) / d_in**0.5).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y" if not adapter else "base"])]
    inits = [w]
    if adapter:
        inits += [
            numpy_helper.from_array(rng.standard_normal((d_in, experts)).astype(np.float32), "Wr"),
            numpy_helper.from_array((rng.standard_normal((experts, rank, d_in)) * 0.01).astype(np.float32), "A"),
            numpy_helper.from_array((rng.standard_normal((experts, d_out, rank)) * 0.01).astype(np.float32), "B"),
            numpy_helper.from_array(np.array([top_k], dtype=np.int64), "k"),
        ]
        nodes += [
            helper.make_node("MatMul", ["x", "Wr"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
            helper.make_node("TopK", ["probs", "k"], ["top", "ids"], axis=-1),
            helper.make_node("ReduceSum", ["top"], ["top_sum"], keepdims=1),  # renormalise the top-k
            helper.make_node("Div", ["top", "top_sum"], ["gates"]),
            helper.make_node(GROUPED_LORA, ["x", "ids", "gates", "A", "B"], ["delta"], domain=DOMAIN,
                             **PLUGIN_ATTRIBUTES),
            helper.make_node("Add", ["base", "delta"], ["y"]),
        ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", d_out])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[grouped_lora_dense_body(18)] if adapter else [])
    return model.SerializeToString()


def layer_7b(args: argparse.Namespace) -> None:
    """One adapted projection against its base MatMul: at 7B size (Llama-7B up 4096 -> 11008 and down
    11008 -> 4096, E=8, R=16, top-2) and at the bench model's size (1024 -> 1024 and 1024 -> 2816, R=8)."""
    shapes = [(4096, 11008, 16), (11008, 4096, 16), (1024, 1024, 8), (1024, 2816, 8)]
    for d_in, d_out, rank in shapes:
        base = projection_model(d_in, d_out, 8, rank, 2, adapter=False)
        moe = projection_model(d_in, d_out, 8, rank, 2, adapter=True)
        runners = {
            "base-only": ort_runner(base, args.threads),
            "moe-export": ort_runner(moe, args.threads),
            "native": ort_runner(moe, args.threads, native=True),
        }
        for tokens in (1, 8, 128, 1024):
            feeds = {"x": np.random.default_rng(1).standard_normal((tokens, d_in)).astype(np.float32)}
            times = measure(runners, feeds, args.runs, args.warmup)
            med = {name: statistics.median(t) for name, t in times.items()}
            cells = "  ".join(f"{n} {med[n] * 1e3:8.3f} ms ({med[n] / med['base-only']:.3f}x)" for n in med)
            print(f"{d_in}->{d_out} R={rank} T={tokens:5d}: {cells}", flush=True)


if __name__ == "__main__":
    main()
