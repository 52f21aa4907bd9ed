"""Write the benchmark checkpoint: a random-init Llama (~170M) + a GOAT-style MoE-LoRA in canonical layout.

    python benchmarks/bench_model.py OUT_DIR     # OUT_DIR/base (HF model), OUT_DIR/ckpt (canonical adapter)

Shapes: hidden 1024, intermediate 2816, 8 layers, 16 heads, vocab 32000; every q/k/v/o/gate/up/down
projection adapted with E=8 experts of rank 8, top-2 routing (renormalised), plus one always-on shared
LoRA per unit (GOAT's base correction). Nothing is committed; the weights are random (seeded).
Legend: E experts, R rank, D_in / D_out projection sizes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moe_export.ir import Adapter, ExpertStack, LinearMoE, Router, SharedLoRA

HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB = 1024, 2816, 8, 16, 32000
EXPERTS, RANK, TOP_K = 8, 8, 2


def projections(hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> dict[str, tuple[int, int]]:
    """Llama projection -> (D_in, D_out) without GQA."""
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, intermediate),
        "mlp.up_proj": (hidden, intermediate),
        "mlp.down_proj": (intermediate, hidden),
    }


def write_base(directory: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(str(directory))
    return directory


def bench_adapter(
    seed: int = 0,
    layers: int = LAYERS,
    experts: int = EXPERTS,
    rank: int = RANK,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> Adapter:
    """GOAT-style canonical adapter: routed experts (B non-zero) + one shared correction per unit; `shapes`
    (projection -> (D_in, D_out)) puts it on another base (the bench model's by default)."""
    g = torch.Generator().manual_seed(seed)
    units = []
    for layer in range(layers):
        for proj, (d_in, d_out) in (shapes or projections()).items():
            a = torch.randn(experts, rank, d_in, generator=g) / d_in**0.5  # [E, R, D_in]
            b = torch.randn(experts, d_out, rank, generator=g) * 0.02  # [E, D_out, R]
            router = Router(
                kind="linear",
                num_experts=experts,
                select="topk",
                top_k=TOP_K,
                renormalize=True,
                weight=torch.randn(experts, d_in, generator=g) / d_in**0.5,  # [E, D_in]
            )
            shared = SharedLoRA(
                torch.randn(rank, d_in, generator=g) / d_in**0.5,
                torch.randn(d_out, rank, generator=g) * 0.02,
                scaling=-1.0,
                origin="goat_base_correction",
            )
            stack = ExpertStack(a, b, torch.full((experts,), 2.0))
            units.append(LinearMoE(f"model.layers.{layer}.{proj}", d_in, d_out, stack, router, [shared]))
    return Adapter(family="canonical", units=units, base_model="../base", notices=["benchmark adapter (random)"])


def write_bench_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """OUT_DIR/base + OUT_DIR/ckpt; returns the checkpoint directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "base" / "config.json").is_file():
        write_base(out_dir / "base", seed)
    return bench_adapter(seed).save(out_dir / "ckpt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_bench_checkpoint(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
