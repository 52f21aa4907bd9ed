"""Prefill and per-token decode latency on CPU: our decoders vs onnxruntime-genai's model builder vs torch.

    python benchmarks/decode_cpu.py [--work /tmp/moe-export-decode-bench] [--batch 1,8] [--past 128] [--threads 2]

One run, the bench model (benchmarks/bench_model.py: Llama hidden 1024, 8 layers, vocab 32000; GOAT-style
E=8 r=8 top-2 on all 7 projections). Variants:
  ours-base   `moe-export onnx --base-only` (KV-cache decoder of the base model)
  ours-moe    `moe-export onnx` of the MoE-LoRA checkpoint (KV-cache decoder, 56 GroupedLoRA nodes)
  builder     `python -m onnxruntime_genai.models.builder -p fp32 -e cpu` of the base model (fused qkv,
              GroupQueryAttention, fused norms): the best base-model export there is
  torch       the faithful PyTorch reference with a DynamicCache (transformers' own decode path)
Prefill: S = past tokens at past length 0. Decode: one token at past length `--past` (random past).
Median of `--runs` interleaved rounds (each round runs every variant once) after `--warmup`; ORT intra-op
threads = torch threads = `--threads`.
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
from bench_model import write_base, write_bench_checkpoint

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # the builder wants a tokenizer next to the model


def prepare(work: Path) -> dict[str, Path]:
    base, ckpt = work / "base", work / "ckpt"
    if not (base / "config.json").is_file():
        write_base(base)
        for name in TOKENIZER_FILES:  # any tokenizer: the builder only copies it
            shutil.copy2(REPO / "samples" / "tiny-llama" / name, base / name)
    if not (ckpt / "manifest.json").is_file():
        write_bench_checkpoint(work)
    paths = {"ours-base": work / "ours-base", "ours-moe": work / "ours-moe", "builder": work / "builder"}
    loaded = None
    for name, base_only in (("ours-base", True), ("ours-moe", False)):
        if not (paths[name] / "model.onnx").is_file():
            loaded = loaded or moe_export.load(ckpt, base_model=base)
            moe_export.export_onnx(loaded, paths[name], base_only=base_only, validate=False, progress=False)
    if not (paths["builder"] / "model.onnx").is_file():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(paths["builder"]),
               "-p", "fp32", "-e", "cpu", "-c", str(work / "builder-cache")]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return paths


def ort_step(path: Path, threads: int) -> Callable[[int, int, int], Callable[[], object]]:
    """(batch, seq, past) -> a callable running one step of the decoder at `path` on random feeds."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
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

    return make


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/moe-export-decode-bench"))
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="ours-base,ours-moe,builder,torch")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    paths = prepare(args.work)
    variants = args.variants.split(",")
    makers = {}
    for variant in variants:
        if variant == "torch":
            loaded = moe_export.load(args.work / "ckpt", base_model=args.work / "base")
            makers[variant] = torch_step(loaded.model.eval(), args.threads)
        else:
            makers[variant] = ort_step(paths[variant], args.threads)
    # Interleaved: every round runs each variant once, so a change in machine load hits all of them alike.
    results: dict[str, dict[str, float]] = {v: {} for v in variants}
    for batch in batches:
        for label, seq, past, runs in (("prefill", args.past, 0, args.runs), ("decode", 1, args.past, args.runs * 3)):
            runners = {v: makers[v](batch, seq, past) for v in variants}
            for run in runners.values():
                for _ in range(args.warmup):
                    run()
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(runs):
                for variant, run in runners.items():
                    start = time.perf_counter()
                    run()
                    times[variant].append(time.perf_counter() - start)
            for variant in variants:
                results[variant][f"{label} b{batch}"] = statistics.median(times[variant]) * 1000
            print(label, batch, {v: round(results[v][f"{label} b{batch}"], 1) for v in variants}, flush=True)
    cols = list(next(iter(results.values())))
    print(f"\n| variant | {' | '.join(c + ' (ms)' for c in cols)} |")
    print("|---|" + "---|" * len(cols))
    for variant, row in results.items():
        print(f"| {variant} | {' | '.join(f'{row[c]:.1f}' for c in cols)} |")
    if {"ours-moe", "builder", "ours-base"} <= set(results):
        for batch in batches:
            key = f"decode b{batch}"
            moe, base, builder = results["ours-moe"][key], results["ours-base"][key], results["builder"][key]
            line = f"b{batch} decode: ours-moe / ours-base {moe / base:.2f}, ours-moe / builder {moe / builder:.2f}"
            if "torch" in results:
                line += f", torch / ours-moe {results['torch'][key] / moe:.2f}"
            print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
