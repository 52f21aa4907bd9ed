"""Big models on one machine: peak RSS and time of `moe-export onnx` (1.1B) and calibrate/merge/onnx (7B).

Generates in a scratch directory (default /tmp/moe-export-big-<preset>, never committed; `--clean` removes it):
  base/   a Llama-shaped model with random bf16 weights, written shard by shard (one decoder layer per shard)
          without ever building the model in memory
  ckpt/   a canonical adapter: E experts of rank R, top-2 linear routers on all 7 projections of every layer,
          plus one always-on shared LoRA per projection (as GOAT's base correction and MixLoRA's attention LoRA);
          7b: every third router collapsed onto one expert (bias), so `merge --merge-threshold 0.9` folds a third
then runs each step in its own subprocess and reports peak RSS (getrusage(RUSAGE_CHILDREN) of a fresh wrapper),
wall time, CPU time (user + sys) and the size of what it wrote.

Presets:
  1b   hidden 2048, 22 layers, intermediate 5632, 32 heads / 4 kv heads, vocab 32000 (1.10B parameters), E=8, r=8
       steps: onnx-fp32, onnx-fp16 (both --no-validate), validate-fp32, validate-fp16 (`validate` alone on those
       exports, layer-streamed reference, validate's default ONNX Runtime level: basic for fp16, all for fp32;
       suffixes -whole: --reference whole, -basic / -all: that --optimization), onnx-fp32-validate,
       onnx-fp16-validate (export then validate in one process); on request api-fp32, api-fp16: the same export
       through `moe_export.export_onnx(ckpt, out, ExportOptions(...))`
  7b   hidden 4096, 32 layers, intermediate 11008, 32 heads / 32 kv heads, vocab 32000 (6.74B parameters), E=8, r=16
       steps: calibrate (--samples/--seq-len), merge (--stats, --no-eval, streaming writer), onnx-merged
       (`onnx merged/adapter --dtype bf16 --no-validate`: the merged base plus the units that stay routed);
       also onnx-fp16 then validate-fp16 (the unmerged adapter in the dtype ORT CPU runs, validated: --steps)

    python benchmarks/big_model.py --preset 1b [--steps onnx-fp32,onnx-fp16] [--json out.json]
    python benchmarks/big_model.py --preset 7b --samples 8 --seq-len 64 [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import measure


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    experts: int
    rank: int
    top_k: int = 2
    collapsed_every: int = 0  # every n-th router's bias favours one expert (a collapsed router merge can fold)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every adapted linear of one decoder layer."""
        kv = self.hidden // self.heads * self.kv_heads
        return {
            "self_attn.q_proj": (self.hidden, self.hidden),
            "self_attn.k_proj": (self.hidden, kv),
            "self_attn.v_proj": (self.hidden, kv),
            "self_attn.o_proj": (self.hidden, self.hidden),
            "mlp.gate_proj": (self.hidden, self.intermediate),
            "mlp.up_proj": (self.hidden, self.intermediate),
            "mlp.down_proj": (self.intermediate, self.hidden),
        }

    def parameters(self) -> int:
        per_layer = sum(i * o for i, o in self.projections().values()) + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden


PRESETS = {
    "1b": Shape(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000, experts=8, rank=8),
    "7b": Shape(
        hidden=4096,
        layers=32,
        intermediate=11008,
        heads=32,
        kv_heads=32,
        vocab=32000,
        experts=8,
        rank=16,
        collapsed_every=3,
    ),
}
STEPS = {
    "1b": ("onnx-fp32", "onnx-fp16", "validate-fp32", "validate-fp16"),
    "7b": ("calibrate", "merge", "onnx-merged"),
}


def make_base(directory: Path, shape: Shape, dtype_name: str = "bfloat16") -> None:
    """Random weights (bf16 unless asked), one shard per decoder layer (embeddings first, norm + head last)."""
    import torch

    dtype = getattr(torch, dtype_name)
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    directory.mkdir(parents=True)
    LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype=dtype_name,
        architectures=["LlamaForCausalLM"],  # as a real checkpoint's config (onnxruntime-genai's builder reads it)
    ).save_pretrained(str(directory))
    g = torch.Generator().manual_seed(0)

    def rand(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=g) * 0.02).to(dtype)

    def group(i: int) -> dict[str, torch.Tensor]:
        if i == 0:
            return {"model.embed_tokens.weight": rand(shape.vocab, shape.hidden)}
        prefix = f"model.layers.{i - 1}"
        tensors = {f"{prefix}.{p}.weight": rand(d_out, d_in) for p, (d_in, d_out) in shape.projections().items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}.{norm}.weight"] = torch.ones(shape.hidden, dtype=dtype)
        if i == shape.layers:
            tensors["model.norm.weight"] = torch.ones(shape.hidden, dtype=dtype)
            tensors["lm_head.weight"] = rand(shape.vocab, shape.hidden)
        return tensors

    weight_map, total, count = {}, 0, shape.layers + 1
    for i in range(count):  # one shard in memory at a time
        tensors = group(i)
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_adapter(ckpt: Path, base: Path, shape: Shape) -> None:
    """A canonical adapter (fp32, as the canonical layout holds it); small next to the base model."""
    import torch

    from moe_export.ir import Adapter, ExpertStack, LinearMoE, Router, SharedLoRA

    g = torch.Generator().manual_seed(1)
    units = []
    for layer in range(shape.layers):
        for proj, (d_in, d_out) in shape.projections().items():
            stack = ExpertStack(
                torch.randn(shape.experts, shape.rank, d_in, generator=g) * 0.01,
                torch.randn(shape.experts, d_out, shape.rank, generator=g) * 0.01,
                torch.full((shape.experts,), 2.0),
            )
            bias = torch.zeros(shape.experts)
            if shape.collapsed_every and len(units) % shape.collapsed_every == 0:
                bias[len(units) % shape.experts] = 12.0  # softmax mass ~1 on one expert, whatever the input
            router = Router(
                "linear",
                shape.experts,
                "topk",
                shape.top_k,
                renormalize=True,
                weight=torch.randn(shape.experts, d_in, generator=g) * 0.05,
                bias=bias,
            )
            shared = SharedLoRA(
                torch.randn(8, d_in, generator=g) * 0.01, torch.randn(d_out, 8, generator=g) * 0.01, 1.0
            )
            units.append(LinearMoE(f"model.layers.{layer}.{proj}", d_in, d_out, stack, router, [shared]))
    Adapter("canonical", units, base_model=str(base)).save(ckpt)


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def step_command(step: str, root: Path, cli: list[str], args: argparse.Namespace) -> tuple[list[str], Path]:
    """The command line of one step and the file or directory it writes."""
    ckpt, out = root / "ckpt", root / step
    if step.startswith("validate-"):
        # validate-fp32[-whole][-basic|-all]: `validate` alone on the kept `onnx-fp32` export (made by that step, kept
        # when a validate step follows); -whole: --reference whole; -basic / -all: that --optimization (validate's
        # default is basic for fp16, where all stores the fp16 weights converted to fp32, and all for fp32).
        _, dtype, *variants = step.split("-")
        export = root / f"onnx-{dtype}"
        if not (export / "export.json").is_file():
            raise SystemExit(f"{step}: no export at {export}; run --steps onnx-{dtype} --keep first")
        known = {
            "whole": ["--reference", "whole"],
            "basic": ["--optimization", "basic"],
            "all": ["--optimization", "all"],
        }
        if set(variants) - set(known):
            raise SystemExit(f"unknown step {step!r}")
        flags = [flag for v in variants for flag in known[v]]
        return [*cli, "validate", str(export), *flags, "--report", str(root / f"{step}.json")], root / f"{step}.json"
    if step.startswith("onnx-fp"):
        dtype = step.split("-")[1]
        flags = [] if step.endswith("-validate") else ["--no-validate"]
        return [*cli, "onnx", str(ckpt), "--dtype", dtype, *flags, "-o", str(out)], out
    if step.startswith("api-fp"):
        # The same export from Python: moe_export.export_onnx on the checkpoint path makes the CLI's load and
        # hand-over decisions itself, so its peak RSS should be the CLI's (issue 22).
        code = (
            "import sys, moe_export; from moe_export.export.options import ExportOptions; "
            "moe_export.export_onnx(sys.argv[1], sys.argv[2], ExportOptions(dtype=sys.argv[3], validate=False))"
        )
        return [sys.executable, "-c", code, str(ckpt), str(out), step.split("-")[1]], out
    if step == "calibrate":
        out = root / "stats.json"
        samples = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        return [*cli, "calibrate", str(ckpt), *samples, "-o", str(out)], out
    if step == "merge":
        flags = ["--merge-threshold", str(args.threshold), "--stats", str(root / "stats.json"), "--no-eval"]
        return [*cli, "merge", str(ckpt), *flags, "-o", str(root / "merged")], root / "merged"
    if step == "onnx-merged":
        # merge writes the units that stay routed to merged/adapter (base_model: merged/ itself); with none left,
        # merged/ is a plain transformers model.
        adapter = root / "merged" / "adapter"
        source, flags = (adapter, []) if adapter.is_dir() else (root / "merged", ["--base-only"])
        flags += ["--dtype", args.merged_dtype, "--no-validate"]
        return [*cli, "onnx", str(source), *flags, "-o", str(out)], out
    raise SystemExit(f"unknown step {step!r}")


def run_step(step: str, root: Path, cli: list[str], args: argparse.Namespace) -> tuple[dict[str, object], Path]:
    """Run one step in its own measured process; its figures and the file or directory it wrote."""
    command, out = step_command(step, root, cli, args)
    if out.is_dir():
        shutil.rmtree(out)
    print(f"{step}: {' '.join(command[1:])}", flush=True)
    result: dict[str, object] = dict(measure(command, root / f"{step}.log"))
    result["log_tail"] = (root / f"{step}.log").read_text().strip().splitlines()[-3:]
    if result["rc"] == 0 and out.exists():
        result["output_mib"] = size_mib(out)
        manifest = out / "export.json"
        if manifest.is_file():
            result["external_data"] = json.loads(manifest.read_text()).get("external_data")
    if step.startswith("validate-") and out.is_file():
        result["passed"] = json.loads(out.read_text()).get("passed")
        export = root / f"onnx-{step.split('-')[1]}"
        result["export_mib"] = size_mib(export)  # the weights validate runs (plus the small graph files)
        result["peak_over_export"] = result["peak_rss_mib"] / result["export_mib"]  # type: ignore[operator]
    if step == "calibrate" and out.is_file():
        result["tokens"] = json.loads(out.read_text()).get("tokens")
    return result, out


def print_summary(figures: dict[str, object], steps: list[str]) -> None:
    """One line per step that ran: peak RSS (and its ratio to the fp32 weights), wall and CPU time, exit code."""
    fp32 = figures["fp32_weight_mib"]
    for step in steps:
        if isinstance(figures.get(step), dict):
            r = figures[step]
            print(
                f"{step:>20}: peak RSS {r['peak_rss_mib']:8.0f} MiB ({r['peak_rss_mib'] / fp32:.2f} x fp32 weights), "  # type: ignore[index]
                f"wall {r['wall_s']:7.0f} s, cpu {r['cpu_s']:7.0f} s, rc {r['rc']}"  # type: ignore[index]
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--dir", type=Path, help="scratch directory (default /tmp/moe-export-big-<preset>)")
    parser.add_argument("--steps", help="comma-separated steps (default: all of the preset's, in order)")
    parser.add_argument("--samples", type=int, default=8, help="calibrate: calibration samples")
    parser.add_argument("--seq-len", type=int, default=64, help="calibrate: tokens per sample")
    parser.add_argument("--threshold", type=float, default=0.9, help="merge: --merge-threshold")
    parser.add_argument("--merged-dtype", default="bf16", help="onnx-merged: --dtype")
    parser.add_argument(
        "--base-dtype",
        choices=("bfloat16", "float16"),
        default="bfloat16",
        help="dtype of the generated base (float16: an fp16 export loads it as stored, so a 7B fp16 export fits)",
    )
    parser.add_argument("--keep", action="store_true", help="keep each step's output (default: delete after measuring)")
    parser.add_argument("--clean", action="store_true", help="remove the scratch directory and exit")
    parser.add_argument("--json", type=Path, help="append the figures to this JSON file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    shape = PRESETS[args.preset]
    root: Path = args.dir or Path(f"/tmp/moe-export-big-{args.preset}")
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)
        return
    base, ckpt = root / "base", root / "ckpt"
    steps = args.steps.split(",") if args.steps else list(STEPS[args.preset])
    needs_base = any(step != "onnx-merged" for step in steps)
    if not (ckpt / "manifest.json").is_file() or (needs_base and not base.is_dir()):
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        make_base(base, shape, args.base_dtype)
        make_adapter(ckpt, base, shape)
        print(f"generated {root} in {time.perf_counter() - t:.0f} s", flush=True)
    params = shape.parameters()
    figures: dict[str, object] = {
        "preset": args.preset,
        "shape": shape.__dict__,
        "parameters": params,
        "fp32_weight_mib": params * 4 / 2**20,
        "base_on_disk_mib": size_mib(base) if base.is_dir() else None,
        "largest_shard_mib": max((size_mib(p) for p in base.glob("*.safetensors")), default=None),
        "adapter_on_disk_mib": size_mib(ckpt),
    }
    cli = [shutil.which("moe-export") or "moe-export"]
    floor = [sys.executable, "-c", "import torch, transformers, moe_export.cli, moe_export.export.onnx"]
    figures["import_floor_mib"] = measure(floor, root / "floor.log")["peak_rss_mib"]
    validated = {f"onnx-{s.split('-')[1]}" for s in steps if s.startswith("validate-")}  # kept for validate-*
    for step in steps:
        result, out = run_step(step, root, cli, args)
        figures[step] = result
        print(json.dumps(result, indent=1), flush=True)
        kept = step in ("calibrate", "merge", *validated) or step.startswith("validate-")  # reports are small
        if not args.keep and not kept and out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        if result["rc"] != 0:
            break
        if step == "merge" and "onnx-merged" in steps and not args.keep:
            shutil.rmtree(base)  # the export reads merged/ only: free the disk before it writes the ONNX model
    print_summary(figures, steps)
    if args.json:
        runs = json.loads(args.json.read_text()) if args.json.is_file() else []
        args.json.write_text(json.dumps([*runs, figures], indent=2) + "\n")


if __name__ == "__main__":
    main()
