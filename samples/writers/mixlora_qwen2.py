"""MixLoRA (top-2 of 4) on the Qwen2 base: always-on LoRAs on the biased q/k/v/o, routed gated FFNs.

Over samples/tiny-qwen2 (q/k/v biases, lm_head tied to the input embeddings), saved like MoE-PEFT
saves it (live parameters in adapter_model.bin).
"""

from __future__ import annotations

from pathlib import Path

from samples.writers.mixlora import write_mixlora

BASE = "tiny-qwen2"


def write(out_dir: Path, base_dir: Path) -> None:
    config = {
        "bias": "none",
        "peft_type": "MIXLORA",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "routing_strategy": "mixlora",
        "num_experts": 4,
        "act_fn": "silu",
        "top_k": 2,
    }
    write_mixlora(out_dir, base_dir, config, seed=611)
