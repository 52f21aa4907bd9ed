"""HydraLoRA sample (Clin0212/HydraLoRA): one shared `lora_A`, B heads `lora_B{e}`, `lora_route`; E = 3."""

from __future__ import annotations

from pathlib import Path

import torch

from samples.writers import BASE_REL, PEFT_PREFIX, linear_shapes, randn, save_bin, write_config

MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write(out_dir: Path, base_dir: Path) -> None:
    g = torch.Generator().manual_seed(606)
    num_heads, rank = 3, 2
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_in, d_out) in linear_shapes(base_dir, MLP).items():
        p = PEFT_PREFIX + module
        tensors[f"{p}.lora_A.weight"] = randn(g, rank, d_in, std=0.2)
        for e in range(num_heads):
            tensors[f"{p}.lora_B{e}.weight"] = randn(g, d_out, rank, std=0.05)
        tensors[f"{p}.lora_route.weight"] = randn(g, num_heads, d_in, std=0.5)
    save_bin(out_dir, tensors)
    write_config(
        out_dir,
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": BASE_REL,
            "r": rank,
            "lora_alpha": 4,
            "lora_nums": num_heads,
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
