"""MoE-PEFT LoRAMoE sample: dense per-linear routers on the MLP (E = 3), plain LoRA on q/v."""

from __future__ import annotations

from pathlib import Path

from samples.writers.moe_peft_mola import write_moe_peft


def write(out_dir: Path, base_dir: Path) -> None:
    config = {
        "bias": "none",
        "peft_type": "LORAMOE",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        "routing_strategy": "loramoe",
        "num_experts": 3,
    }
    write_moe_peft(out_dir, base_dir, config, routed={"gate_proj", "up_proj", "down_proj"}, seed=604)
