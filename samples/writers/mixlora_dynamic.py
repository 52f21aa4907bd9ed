"""MixLoRA sample with dynamic (top-p) routing, `expert_lora` ranks and an un-adapted up_proj.

No `act_fn` is saved, so the activation is the base model's `hidden_act`; the kept probabilities
are not renormalised (MoE-PEFT `_dynamic_top_p`).
"""

from __future__ import annotations

from pathlib import Path

from samples.writers.mixlora import write_mixlora


def write(out_dir: Path, base_dir: Path) -> None:
    config = {
        "bias": "none",
        "peft_type": "MIXLORA",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"],
        "expert_lora": {"r": 4, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none"},
        "routing_strategy": "mixlora-dynamic",
        "num_experts": 4,
        "top_p": 0.6,
        "temperature": 0.0,
    }
    write_mixlora(out_dir, base_dir, config, seed=602)
