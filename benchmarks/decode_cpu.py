"""The decode benchmark: prefill and per-token decode latency on CPU, our decoders against onnxruntime-genai's
model builder and torch, in one interleaved run.

    flock /tmp/heavy.lock python benchmarks/decode_cpu.py [--model bench|1b] [--work DIR] [--batch 1,8]
        [--past 128] [--threads 2] [--runs 7] [--variants ...] [--extra NAME=EXPORT_DIR ...] [--json out.json]

The bench model (benchmarks/bench_model.py: Llama hidden 1024, 8 layers, vocab 32000; GOAT-style E=8 r=8 top-2 on
all 7 projections), or with `--model 1b` the same kind of adapter on a TinyLlama-1.1B-shaped base (benchmarks/
big_model.py's 1b preset: hidden 2048, 22 layers, 32 / 4 kv heads, random bf16 weights). Variants:
  ours-base          `moe-export onnx --base-only --fusion contrib` (KV-cache decoder of the base model), fp32:
                     GroupQueryAttention (rotating q and k itself), SkipSimplifiedLayerNormalization, one MatMul for
                     q/k/v per layer (export/packing.py)
  ours-base-plain    the same with `--fusion none`, the default (transformers' attention traced into standard ops)
  ours-moe-body      `moe-export onnx --fusion contrib` of the MoE-LoRA checkpoint, ORT running the function bodies
  ours-moe-native    the same file with the native kernel library registered (moe_export/runtimes/native)
  ours-moe-native-plain  `--fusion none` of the same, native kernels
  ours-moe-int4      `moe-export onnx --quantize int4 --fusion contrib` (MatMulNBits, block 32, accuracy level 4; the
                     embedding as GatherBlockQuantized), native kernels
  ours-moe-int4-plain    `--fusion none` of the same
  ours-base-int4     `--base-only --quantize int4 --fusion contrib`: our int4 graph without the adapter, which splits
                     ours-moe-int4 / builder-int4 into the base graph's share and the adapter's
  ours-moe-native-unfused  ours-moe-native exported with `--no-adapter-fusion`: routers (MatMul, Softmax, TopK,
                     ReduceSum, Div), GroupedLoRA and the residual Add as separate nodes (before
                     RoutedGroupedLoRAAdd, export/onnx_routed.py), native kernels
  ours-moe-int4-unfused  the same for ours-moe-int4
  builder-fp32       `python -m onnxruntime_genai.models.builder -p fp32 -e cpu` of the base model's local
                     directory (offline): fused qkv, GroupQueryAttention, fused norms
  builder-int4       the same with `-p int4` (MatMulNBits, lm_head included)
  torch              the faithful PyTorch reference with a DynamicCache (transformers' own decode path)
Prefill: S = `--past` tokens at past length 0. Decode: one token at past length `--past` (random past).
Median of `--runs` (prefill) / 3x `--runs` (decode) interleaved rounds, each round running every variant once in a
rotating order, after `--warmup`; ORT intra-op threads = torch threads = `--threads`. Wall time and this process's
CPU time (user+sys) per call are both printed: on a shared machine CPU time is the steadier of the two.
Then the ratios the decode goals are stated in, the adapter's weight traffic per decoded token (and what it costs
at one thread's streaming rate), the export sizes, and the int4 export's quantization cost
(top-1 agreement, perplexity) against the fp32 reference on held-out text (validation/quantized.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import moe_export
from moe_export.export.decoder import cache_argument
from moe_export.export.interface import KVLayout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import HIDDEN, bench_adapter, write_base, write_bench_checkpoint
from big_model import PRESETS, make_base

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # the builder wants a tokenizer next to the model
VARIANTS = (
    "ours-base",
    "ours-base-plain",
    "ours-moe-body",
    "ours-moe-native",
    "ours-moe-native-plain",
    "ours-moe-int4",
    "ours-moe-int4-plain",
    "ours-base-int4",
    "ours-moe-native-unfused",
    "ours-moe-int4-unfused",
    "builder-fp32",
    "builder-int4",
    "torch",
)
# variant -> (export directory, native kernels)
ORT_VARIANTS = {
    "ours-base": ("ours-base", False),
    "ours-base-plain": ("ours-base-plain", False),
    "ours-moe-body": ("ours-moe", False),
    "ours-moe-native": ("ours-moe", True),
    "ours-moe-native-plain": ("ours-moe-plain", True),
    "ours-moe-int4": ("ours-moe-int4", True),
    "ours-moe-int4-plain": ("ours-moe-int4-plain", True),
    "ours-base-int4": ("ours-base-int4", False),
    "ours-moe-native-unfused": ("ours-moe-unfused", True),
    "ours-moe-int4-unfused": ("ours-moe-int4-unfused", True),
    "builder-fp32": ("builder-fp32", False),
    "builder-int4": ("builder-int4", False),
}
# our export directories -> export_onnx options
OUR_EXPORTS = {
    "ours-base": {"base_only": True, "fusion": "contrib"},
    "ours-base-plain": {"base_only": True, "fusion": "none"},
    "ours-moe": {"fusion": "contrib"},
    "ours-moe-plain": {"fusion": "none"},
    "ours-moe-int4": {"quantize": "int4", "fusion": "contrib"},
    "ours-moe-int4-plain": {"quantize": "int4", "fusion": "none"},
    "ours-base-int4": {"base_only": True, "quantize": "int4", "fusion": "contrib"},
    "ours-moe-unfused": {"fusion": "contrib", "adapter_fusion": False},
    "ours-moe-int4-unfused": {"quantize": "int4", "fusion": "contrib", "adapter_fusion": False},
}


def prepare(work: Path, variants: list[str], model: str = "bench") -> dict[str, Path]:
    """The base + checkpoint (`model`: the bench model or a big_model.py preset) and the variants' exports (each
    made once; later runs reuse one whose export.json records the same fusion mode and adapter passes)."""
    base, ckpt = work / "base", work / "ckpt"
    hidden = HIDDEN if model == "bench" else PRESETS[model].hidden
    if (base / "config.json").is_file() and json.loads((base / "config.json").read_text())["hidden_size"] != hidden:
        raise SystemExit(f"--work {work}: its base is not the {model} model's; use another --work")
    if not (base / "config.json").is_file():
        if model == "bench":
            write_base(base)
        else:
            shutil.rmtree(base, ignore_errors=True)  # a partial base from an interrupted run
            make_base(base, PRESETS[model])
        for name in TOKENIZER_FILES:  # any tokenizer: the builder only copies it
            shutil.copy2(REPO / "samples" / "tiny-llama" / name, base / name)
    if not (ckpt / "manifest.json").is_file():
        if model == "bench":
            write_bench_checkpoint(work)
        else:  # the bench model's GOAT-style adapter (E=8, r=8, top-2, no router bias) on the bigger base
            shape = PRESETS[model]
            bench_adapter(layers=shape.layers, shapes=shape.projections()).save(ckpt)
    wanted = {ORT_VARIANTS[v][0] for v in variants if v in ORT_VARIANTS} | {"ours-moe", "ours-moe-int4"}
    dirs = {name: work / name for name in sorted(wanted)}
    for name, options in OUR_EXPORTS.items():
        adapter = options.get("adapter_fusion", not options.get("base_only", False))  # base-only: no adapter
        if name in dirs and _fusion_key(dirs[name]) != (options["fusion"], options["fusion"] == "contrib", adapter):
            print(f"exporting {name}", flush=True)
            loaded = moe_export.load(ckpt, base_model=base)
            moe_export.export_onnx(
                loaded, dirs[name], validate=False, progress=False, consume=True, force=True, **options
            )
    for precision in ("fp32", "int4"):
        out = dirs.get(f"builder-{precision}")
        if out is not None and not (out / "model.onnx").is_file():
            print(f"building builder-{precision} (onnxruntime-genai model builder, offline)", flush=True)
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(out),
                   "-p", precision, "-e", "cpu", "-c", str(work / "builder-cache")]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dirs


def _fusion_key(directory: Path) -> tuple[str, bool, bool] | None:
    """The fusion mode export.json records, whether its projections are packed (export/packing.py) with the rotary
    placement recorded (exports from before it rotate outside attention at any head size), and whether
    the adapter passes ran (export/onnx_routed.py; an export from before them counts as without); None: no
    export there yet."""
    if not (directory / "export.json").is_file():
        return None
    manifest = json.loads((directory / "export.json").read_text())
    fusion = manifest.get("fusion") or {}
    adapter = bool((manifest.get("adapter_fusion") or {}).get("requested", False))
    return fusion.get("mode", "none"), bool(fusion.get("packed")) and "rotary" in fusion, adapter


def extra_variants(specs: list[str]) -> dict[str, tuple[Path, bool]]:
    """--extra NAME=DIR: export directories made elsewhere (another commit's code, other options), timed in the
    same rounds; native kernels when the export has custom ops."""
    extra = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        path = Path(folder)
        if not sep or name in VARIANTS or not (path / "export.json").is_file():
            raise SystemExit(f"--extra {spec}: expected NEW_NAME=EXPORT_DIR (a directory with export.json)")
        extra[name] = (path, bool(json.loads((path / "export.json").read_text()).get("custom_ops")))
    return extra


def native_library() -> str:
    from moe_export.runtimes.native import session_library

    library, reason = session_library()
    if library is None:
        raise SystemExit(f"the native kernel library is not available ({reason}): `moe-export kernels build`")
    return str(library)


def ort_step(
    path: Path, threads: int, native: bool, profile_prefix: str | None = None
) -> Callable[[int, int, int], Callable[[], object]]:
    """(batch, seq, past) -> a callable running one step of the decoder in `path` on random feeds."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if native:
        options.register_custom_ops_library(native_library())
    session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)

    def make(batch: int, seq: int, past: int) -> Callable[[], object]:
        feeds = {}
        for value in session.get_inputs():
            if value.name == "input_ids":
                feeds[value.name] = rng.integers(0, 1000, size=(batch, seq), dtype=np.int64)
            elif value.name == "attention_mask":
                feeds[value.name] = np.ones((batch, past + seq), dtype=np.int64)
            elif value.name == "position_ids":
                feeds[value.name] = np.arange(past, past + seq, dtype=np.int64)[None].repeat(batch, 0)
            else:  # past key/value [batch, kv_heads, past, head_dim]; the builder leaves head_dim symbolic
                heads, head_dim = value.shape[1], value.shape[3]
                if not isinstance(head_dim, int):
                    head_dim = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
                feeds[value.name] = rng.standard_normal((batch, heads, past, head_dim), dtype=np.float32)
        return lambda: session.run(None, feeds)

    make.session = session  # type: ignore[attr-defined]  # for --profile's end_profiling
    return make


def profile(dirs: dict[str, Path], variants: list[str], args: argparse.Namespace) -> None:
    """ms per op type of one decode step (batch 1, past `--past`), from ORT's profiler, per ORT variant."""
    for variant in variants:
        if variant not in ORT_VARIANTS:
            continue
        folder, native = ORT_VARIANTS[variant]
        make = ort_step(dirs[folder], args.threads, native, str(args.work / f"profile-{variant}"))
        run = make(1, 1, args.past)
        rounds = args.warmup + args.runs * 3
        for _ in range(rounds):
            run()
        events = json.loads(Path(make.session.end_profiling()).read_text())  # type: ignore[attr-defined]
        per_op: dict[str, float] = {}
        kernels = 0
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                op = event.get("args", {}).get("op_name", "?")
                per_op[op] = per_op.get(op, 0.0) + event["dur"] / 1e3 / rounds
                kernels += 1
        total = sum(per_op.values())
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:10])
        print(f"{variant}: {kernels // rounds} kernels, {total:.2f} ms per step; {top}", flush=True)


def torch_step(model: torch.nn.Module, threads: int) -> Callable[[int, int, int], Callable[[], object]]:
    from transformers import DynamicCache

    torch.set_num_threads(threads)
    layout = KVLayout.from_config(model.config)

    def make(batch: int, seq: int, past: int) -> Callable[[], object]:
        ids = torch.randint(0, 1000, (batch, seq))
        mask = torch.ones(batch, past + seq, dtype=torch.int64)
        positions = torch.arange(past, past + seq)[None].expand(batch, seq)
        kv = [torch.randn(batch, layout.kv_heads, past, layout.head_dim) for _ in range(2 * layout.num_layers)]

        def run() -> object:
            cache = DynamicCache(config=model.config)  # a fresh cache: forward appends to it
            for i in range(layout.num_layers):
                cache.update(kv[2 * i], kv[2 * i + 1], i)
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{cache_argument(model): cache})  # fmt: skip

        return run

    return make


def time_rounds(runners: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, tuple[float, float]]:
    """variant -> (median wall ms, median CPU ms) over `runs` interleaved rounds in rotating order."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    wall: dict[str, list[float]] = {v: [] for v in runners}
    cpu: dict[str, list[float]] = {v: [] for v in runners}
    names = list(runners)
    for i in range(runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            runners[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {v: (statistics.median(wall[v]) * 1e3, statistics.median(cpu[v]) * 1e3) for v in runners}


def export_bytes(directory: Path) -> int:
    return sum(
        p.stat().st_size for p in directory.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")
    )


def ratio_lines(results: dict[str, dict[str, tuple[float, float]]], batches: list[int]) -> list[str]:
    """The goals' ratios (wall / CPU time) for the cells that were measured."""
    lines = []

    def ratio(a: str, b: str, cell: str) -> None:
        if a in results and b in results and cell in results[a] and cell in results[b]:
            (wa, ca), (wb, cb) = results[a][cell], results[b][cell]
            lines.append(f"{cell:11s} {a} / {b}: {wa / wb:.3f} wall, {ca / cb:.3f} cpu")

    for batch in batches:
        for phase in ("prefill", "decode"):
            cell = f"{phase} b{batch}"
            ratio("ours-moe-int4", "builder-int4", cell)
            ratio("ours-moe-int4-plain", "builder-int4", cell)
            ratio("ours-moe-int4", "ours-base-int4", cell)
            ratio("ours-base-int4", "builder-int4", cell)
            ratio("ours-moe-native", "builder-fp32", cell)
            ratio("ours-moe-native-plain", "builder-fp32", cell)
            ratio("ours-moe-native", "ours-base", cell)
            ratio("ours-base", "builder-fp32", cell)
            ratio("ours-base", "ours-base-plain", cell)
            ratio("ours-moe-native", "ours-moe-body", cell)
            ratio("ours-moe-native", "ours-moe-native-unfused", cell)
            ratio("ours-moe-int4", "ours-moe-int4-unfused", cell)
    return lines


def measure(
    makers: dict[str, Callable[[int, int, int], Callable[[], object]]],
    variants: list[str],
    batches: list[int],
    args: argparse.Namespace,
) -> dict[str, dict[str, tuple[float, float]]]:
    """variant -> cell ("decode b1"...) -> (median wall ms, median CPU ms), every cell in interleaved rounds."""
    results: dict[str, dict[str, tuple[float, float]]] = {v: {} for v in variants}
    for batch in batches:
        for phase, seq, past, runs in (("decode", 1, args.past, args.runs * 3), ("prefill", args.past, 0, args.runs)):
            cell = f"{phase} b{batch}"
            measured = time_rounds({v: makers[v](batch, seq, past) for v in variants}, runs, args.warmup)
            for variant, value in measured.items():
                results[variant][cell] = value
            print(cell, "wall/cpu ms", {v: (round(w, 1), round(c, 1)) for v, (w, c) in measured.items()}, flush=True)
    return results


def adapter_read_per_token(directory: Path) -> int:
    """Bytes of weights the routed nodes of the export in `directory` read for one token: each router's weight,
    and the k selected experts' A and B (a shared A once). The floor of a b1 decode step's adapter traffic."""
    import onnx
    from onnx.helper import get_attribute_value

    from moe_export.ops.names import ROUTED_OP_TYPES

    model = onnx.load(directory / "model.onnx", load_external_data=False)
    sizes = {t.name: (list(t.dims), onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
             for t in model.graph.initializer}  # fmt: skip
    total = 0
    for node in model.graph.node:
        if node.op_type not in ROUTED_OP_TYPES:
            continue
        k = next(get_attribute_value(a) for a in node.attribute if a.name == "k")
        (router, size), (a_dims, _), (b_dims, _) = (sizes[name] for name in node.input[1:4])
        per_expert_a = a_dims[1] * a_dims[2]
        total += size * (
            router[0] * router[1] + per_expert_a * (1 if a_dims[0] == 1 else k) + k * b_dims[1] * b_dims[2]
        )
    return total


def read_bandwidth() -> float:
    """GB/s of one thread streaming a 512 MB array (numpy's max: vectorised, no writes), best of three."""
    array = np.ones(2**27, np.float32)
    best = min(_timed(array.max) for _ in range(3))
    return array.nbytes / best / 1e9


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def adapter_traffic_lines(dirs: dict[str, Path], results: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """The adapter's fp32 weights a b1 decode step reads: bytes per token, and those bytes at one thread's DRAM
    streaming rate as a share of the builder's int4 step. A scale, not a cost model: weights that stay in the
    last-level cache come faster (one 1b run came in under it), and the routed nodes' time does not follow their
    bytes (experts read as bf16, 40% fewer bytes, cut it 2-5%; README, "Where a routed node's time goes")."""
    bytes_read = adapter_read_per_token(dirs["ours-moe-int4"])
    bandwidth = read_bandwidth()
    stream_ms = bytes_read / bandwidth / 1e6
    lines = [f"adapter weights read per token: {bytes_read / 1e6:.1f} MB (routers + k experts' A and B, fp32); "
             f"one thread streams {bandwidth:.1f} GB/s here, which is {stream_ms:.2f} ms per b1 decode step"]  # fmt: skip
    builder = results.get("builder-int4", {}).get("decode b1")
    if builder:
        lines.append(f"  = {stream_ms / builder[0]:.3f} of builder-int4's decode b1 ({builder[0]:.1f} ms) at that "
                     "rate (a scale: the routed nodes' time does not follow their bytes)")  # fmt: skip
    return lines


def sizes_and_quality(dirs: dict[str, Path], args: argparse.Namespace) -> tuple[dict[str, int], dict | None]:
    """The export sizes, and the int4 export's quantization cost (None with --no-quality); both printed."""
    sizes = {name: export_bytes(path) for name, path in dirs.items() if path.is_dir()}
    print("\nexport sizes (MB): " + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in sizes.items()))
    if "builder-int4" in sizes and "builder-fp32" in sizes:
        print(f"ours-moe-int4 / ours-moe size: {sizes['ours-moe-int4'] / sizes['ours-moe']:.3f}; "
              f"builder-int4 / builder-fp32: {sizes['builder-int4'] / sizes['builder-fp32']:.3f}")  # fmt: skip
    if args.no_quality:
        return sizes, None
    from moe_export.export.manifest import Artifact
    from moe_export.runtimes.registry import RunnerOptions
    from moe_export.validation.quantized import quantization_cost

    cost = quantization_cost(Artifact.open(dirs["ours-moe-int4"]), RunnerOptions(threads=args.threads))
    print(f"quantization cost: {cost.message}")
    return sizes, cost.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", type=Path, help="exports and inputs, reused (default: /tmp/moe-export-decode-bench[-MODEL])"
    )
    parser.add_argument("--model", choices=["bench", "1b"], default="bench", help="the base + adapter")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-quality", action="store_true", help="skip the int4 export's top-1 / perplexity check")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", action="store_true", help="instead: per-op ORT profile of a b1 decode step")
    parser.add_argument("--extra", action="append", default=[], help="NAME=EXPORT_DIR: also time this export")
    args = parser.parse_args()
    if args.work is None:
        args.work = Path("/tmp/moe-export-decode-bench" + ("" if args.model == "bench" else f"-{args.model}"))
    batches = [int(b) for b in args.batch.split(",")]
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    dirs = prepare(args.work, variants, args.model)
    if args.profile:
        profile(dirs, variants, args)
        return
    extra = extra_variants(args.extra)
    makers = {name: ort_step(path, args.threads, native) for name, (path, native) in extra.items()}
    variants += list(extra)
    for variant in variants:
        if variant in makers:
            continue
        if variant == "torch":
            loaded = moe_export.load(args.work / "ckpt", base_model=args.work / "base")
            makers[variant] = torch_step(loaded.model.eval(), args.threads)
        else:
            folder, native = ORT_VARIANTS[variant]
            makers[variant] = ort_step(dirs[folder], args.threads, native)
    results = measure(makers, variants, batches, args)
    cells = list(next(iter(results.values())))
    print(f"\nms per call, wall / cpu (user+sys); {args.threads} ORT/torch threads, past {args.past}")
    print(f"| variant | {' | '.join(cells)} |")
    print("|---|" + "---:|" * len(cells))
    for variant, row in results.items():
        print(f"| {variant} | {' | '.join(f'{row[c][0]:.1f} / {row[c][1]:.1f}' for c in cells)} |")
    print()
    for line in ratio_lines(results, batches):
        print(line)
    if "ours-moe-int4" in dirs:
        print("\n".join(adapter_traffic_lines(dirs, results)))
    sizes, quality = sizes_and_quality(dirs, args)
    if args.json:
        payload = {"results_ms_wall_cpu": results, "sizes_bytes": sizes, "quantization": quality,
                   "threads": args.threads, "past": args.past}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
