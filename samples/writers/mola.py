"""MoLA sample: GCYZSL/MoLA's adapter_model.bin, 2 experts in layer 0 and 4 in layer 1, r = [2, 4].

MoLA saves neither expert counts nor top-k; `r` is a per-layer list (peft_type LORA).
"""

from __future__ import annotations

from pathlib import Path

import torch

from samples.writers import BASE_REL, PEFT_PREFIX, linear_shapes, randn, save_bin, write_config

EXPERTS_PER_LAYER = (2, 4)
RANK_PER_LAYER = (2, 4)


def write(out_dir: Path, base_dir: Path) -> None:
    g = torch.Generator().manual_seed(202)
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_in, d_out) in linear_shapes(base_dir).items():
        layer = int(module.split(".layers.")[1].split(".")[0])
        p, num_experts, rank = PEFT_PREFIX + module, EXPERTS_PER_LAYER[layer], RANK_PER_LAYER[layer]
        for e in range(num_experts):
            tensors[f"{p}.lora_A_{e}.weight"] = randn(g, rank, d_in, std=0.2)
            tensors[f"{p}.lora_B_{e}.weight"] = randn(g, d_out, rank, std=0.025)
        tensors[f"{p}.router.router.weight"] = randn(g, num_experts, d_in, std=0.5)
    save_bin(out_dir, tensors)
    write_config(
        out_dir,
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": BASE_REL,
            "r": list(RANK_PER_LAYER),
            "lora_alpha": 16,
            "lora_dropout": 0.05,
            "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
            "fan_in_fan_out": False,
            "bias": "none",
            "modules_to_save": None,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
        },
    )
