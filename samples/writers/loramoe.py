"""LoRAMoE sample (Ablustrund/LoRAMoE): `lora_A{e}` / `lora_B{e}` / `lora_route` on the MLP, E = 4.

Saved in bf16 as DeepSpeed bf16 training leaves it (docs/formats.md, "loramoe"); no adapter-name component.
"""

from __future__ import annotations

from pathlib import Path

import torch

from samples.writers import BASE_REL, PEFT_PREFIX, linear_shapes, randn, save_bin, write_config

MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write(out_dir: Path, base_dir: Path) -> None:
    g = torch.Generator().manual_seed(605)
    num_experts, rank = 4, 2
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_in, d_out) in linear_shapes(base_dir, MLP).items():
        p = PEFT_PREFIX + module
        for e in range(num_experts):
            tensors[f"{p}.lora_A{e}.weight"] = randn(g, rank, d_in, std=0.2)
            tensors[f"{p}.lora_B{e}.weight"] = randn(g, d_out, rank, std=0.02)
        tensors[f"{p}.lora_route.weight"] = randn(g, num_experts, d_in, std=0.5)
    save_bin(out_dir, {k: v.to(torch.bfloat16) for k, v in tensors.items()})
    write_config(
        out_dir,
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": BASE_REL,
            "r": rank,
            "lora_alpha": 8,
            "lora_nums": num_experts,
            "blc_alpha": 0.0,
            "blc_weight": 0.0,
            "lora_dropout": 0.05,
            "target_modules": ["gate_proj", "down_proj", "up_proj"],
            "merge_weights": False,
            "fan_in_fan_out": False,
            "enable_lora": None,
            "bias": "none",
            "modules_to_save": None,
            "inference_mode": True,
        },
    )
