"""MoE-PEFT MoLA sample: per-linear `moe_gate` + `experts.{e}` on all 7 projections, E = 4, top-2.

`write_moe_peft` is shared with the MoE-PEFT LoRAMoE sample: projections in `routed` get a router
and experts, the other targets a plain LoRA (docs/formats.md, "MoE-PEFT layout").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from samples.writers import base_rel, linear_shapes, randn, save_bin, write_config


def write_moe_peft(out_dir: Path, base_dir: Path, config: dict[str, Any], routed: set[str], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    prefix, rank = config["routing_strategy"], config["r"]
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_in, d_out) in linear_shapes(base_dir).items():
        layer, block, proj = module.split(".")[2:]
        if proj not in config["target_modules"]:
            continue
        key = f"{prefix}.layers.{layer}.{block}.{proj}"
        if proj not in routed:
            tensors[f"{key}.lora_A.weight"] = randn(g, rank, d_in, std=0.2)
            tensors[f"{key}.lora_B.weight"] = randn(g, d_out, rank, std=0.05)
            continue
        tensors[f"{key}.moe_gate.weight"] = randn(g, config["num_experts"], d_in, std=0.5)
        for e in range(config["num_experts"]):
            tensors[f"{key}.experts.{e}.lora_A.weight"] = randn(g, rank, d_in, std=0.2)
            tensors[f"{key}.experts.{e}.lora_B.weight"] = randn(g, d_out, rank, std=0.05)
    save_bin(out_dir, tensors, trained=True)  # MoE-PEFT saves live parameters (requires_grad)
    write_config(out_dir, {**config, "base_model_name_or_path": base_rel(base_dir), "task_type": "CAUSAL_LM"})


def write(out_dir: Path, base_dir: Path, seed: int = 603) -> None:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = {
        "bias": "none",
        "peft_type": "MOLA",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.05,
        "target_modules": targets,
        "routing_strategy": "mola",
        "num_experts": 4,
        "top_k": 2,
    }
    write_moe_peft(out_dir, base_dir, config, routed=set(targets), seed=seed)
