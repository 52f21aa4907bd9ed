"""MoELoRA (Luo et al.) sample in moe-export's PEFT-style layout (see moe_export/formats/moelora.py).

E=4 experts of rank 2 each, top-2, attention projections only (q, k, v, o).
"""

from __future__ import annotations

from pathlib import Path

import torch

from samples.writers import BASE_REL, PEFT_PREFIX, linear_shapes, randn, save_safetensors, write_config

NUM_EXPERTS, RANK, TOP_K = 4, 2, 2
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def write(out_dir: Path, base_dir: Path) -> None:
    g = torch.Generator().manual_seed(404)
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_in, d_out) in linear_shapes(base_dir, TARGETS).items():
        p = PEFT_PREFIX + module
        for e in range(NUM_EXPERTS):
            tensors[f"{p}.lora_A.{e}.weight"] = randn(g, RANK, d_in, std=0.2)
            tensors[f"{p}.lora_B.{e}.weight"] = randn(g, d_out, RANK, std=0.03)
        tensors[f"{p}.lora_router.weight"] = randn(g, NUM_EXPERTS, d_in, std=0.5)
    save_safetensors(out_dir, tensors)
    write_config(
        out_dir,
        {
            "peft_type": "MOELORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": BASE_REL,
            "num_experts": NUM_EXPERTS,
            "top_k": TOP_K,
            "r": RANK,
            "lora_alpha": 8,
            "use_rslora": False,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
    )
