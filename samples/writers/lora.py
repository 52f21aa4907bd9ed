"""Plain PEFT LoRA sample (adapter_model.safetensors), r=4 on every projection, the E=1 degenerate case."""

from __future__ import annotations

from pathlib import Path

import torch

from samples.writers import BASE_REL, PEFT_PREFIX, linear_shapes, randn, save_safetensors, write_config

RANK = 4


def write(out_dir: Path, base_dir: Path) -> None:
    g = torch.Generator().manual_seed(505)
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_in, d_out) in linear_shapes(base_dir).items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = randn(g, RANK, d_in, std=0.2)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = randn(g, d_out, RANK, std=0.03)
    save_safetensors(out_dir, tensors)
    write_config(
        out_dir,
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": BASE_REL,
            "r": RANK,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "use_rslora": False,
            "use_dora": False,
            "bias": "none",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "rank_pattern": {},
            "alpha_pattern": {},
            "fan_in_fan_out": False,
            "inference_mode": True,
        },
    )
