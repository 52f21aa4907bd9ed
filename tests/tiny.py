"""Tiny synthetic models and adapters for tests (hidden 32, 2 layers, E=4, r=2)."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_export.ir import Adapter, ExpertStack, LinearMoE, Router, SharedLoRA

PROJECTIONS = {
    "self_attn.q_proj": (32, 32),
    "self_attn.k_proj": (32, 16),
    "self_attn.v_proj": (32, 16),
    "self_attn.o_proj": (32, 32),
    "mlp.gate_proj": (32, 48),
    "mlp.up_proj": (32, 48),
    "mlp.down_proj": (48, 32),
}


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def save_tiny_llama(directory: Path, seed: int = 0) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.save_pretrained(str(directory))
    return directory


def random_adapter(
    num_layers: int = 2,
    num_experts: int = 4,
    rank: int = 2,
    top_k: int | None = 2,
    shared_a: bool = False,
    with_shared: bool = True,
    seed: int = 0,
    projections: dict[str, tuple[int, int]] = PROJECTIONS,
) -> Adapter:
    """A random canonical adapter over the tiny Llama: every projection routed, optional shared LoRA."""
    g = torch.Generator().manual_seed(seed)
    units = []
    for layer in range(num_layers):
        for proj, (d_in, d_out) in projections.items():
            name = f"model.layers.{layer}.{proj}"
            a = torch.randn(1 if shared_a else num_experts, rank, d_in, generator=g) * 0.3
            b = torch.randn(num_experts, d_out, rank, generator=g) * 0.3
            scaling = torch.rand(num_experts, generator=g) + 0.5
            select = "topk" if top_k else "dense"
            router = Router(
                kind="linear",
                num_experts=num_experts,
                select=select,
                top_k=top_k,
                renormalize=bool(top_k),
                weight=torch.randn(num_experts, d_in, generator=g),
            )
            shared = []
            if with_shared:
                shared.append(
                    SharedLoRA(torch.randn(3, d_in, generator=g) * 0.2, torch.randn(d_out, 3, generator=g) * 0.2, -0.1)
                )
            units.append(LinearMoE(name, d_in, d_out, ExpertStack(a, b, scaling), router, shared))
    return Adapter(family="canonical", units=units)
