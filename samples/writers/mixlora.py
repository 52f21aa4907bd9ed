"""MixLoRA sample (top-k): MoE-PEFT's adapter_model.bin + adapter_config.json, E = 4, top-2.

Every MLP block has one router `mixlora.layers.{i}.mlp.moe_gate.weight` and per-expert LoRAs on
gate/up/down; the attention projections carry a plain always-on LoRA (formats.md section 4).
`write_mixlora` is shared with the dynamic (top-p) sample and the Qwen2 one. Saved the way MoE-PEFT's
`save_adapter_weight` saves it: live parameters, which come back from `torch.load` with requires_grad.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from samples.writers import base_rel, linear_shapes, randn, save_bin, write_config

NUM_EXPERTS = 4


def write_mixlora(out_dir: Path, base_dir: Path, config: dict[str, Any], seed: int) -> None:
    """Random MixLoRA weights for the targets in `config` (experts use `expert_lora` r when given)."""
    g = torch.Generator().manual_seed(seed)
    targets = set(config["target_modules"])
    rank = config["r"]
    expert_rank = (config.get("expert_lora") or {}).get("r", rank)
    tensors: dict[str, torch.Tensor] = {}
    hidden = None
    for module, (d_in, d_out) in linear_shapes(base_dir).items():
        layer, block, proj = module.split(".")[2:]
        if proj not in targets:
            continue
        key = f"mixlora.layers.{layer}.{block}.{proj}"
        if block == "self_attn":
            tensors[f"{key}.lora_A.weight"] = randn(g, rank, d_in, std=0.2)
            tensors[f"{key}.lora_B.weight"] = randn(g, d_out, rank, std=0.05)
            continue
        hidden = d_in if proj != "down_proj" else d_out
        for e in range(config["num_experts"]):
            tensors[f"{key}.experts.{e}.lora_A.weight"] = randn(g, expert_rank, d_in, std=0.2)
            tensors[f"{key}.experts.{e}.lora_B.weight"] = randn(g, d_out, expert_rank, std=0.05)
    assert hidden is not None, "a MixLoRA sample needs at least one MLP target"
    for layer in sorted({int(k.split(".")[2]) for k in tensors}):
        tensors[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = randn(g, config["num_experts"], hidden, std=0.5)
    save_bin(out_dir, tensors, trained=True)
    write_config(out_dir, {**config, "base_model_name_or_path": base_rel(base_dir), "task_type": "CAUSAL_LM"})


def write(out_dir: Path, base_dir: Path) -> None:
    config = {
        "bias": "none",
        "peft_type": "MIXLORA",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "routing_strategy": "mixlora",
        "num_experts": NUM_EXPERTS,
        "act_fn": "silu",
        "top_k": 2,
    }
    write_mixlora(out_dir, base_dir, config, seed=601)
