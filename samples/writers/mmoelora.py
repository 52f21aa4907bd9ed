"""MOELoRA (task-gated) sample: liuqidong07/MOELoRA-peft's adapter_model.bin on a Llama base.

E=4 experts of rank 2 (config r=8 is the total rank), 3 tasks (+1 padding row), task embedding 8.
Each expert matrix is saved twice (`loraA.{e}.mlp.weight` and its alias `loraA.{e}.weight`); each
layer also saves an unused copy of the task gate; the global gate sits at the top level.
"""

from __future__ import annotations

from pathlib import Path

import torch

from samples.writers import BASE_REL, PEFT_PREFIX, linear_shapes, randn, save_bin, write_config

NUM_EXPERTS, RANK, TASKS, TASK_DIM = 4, 8, 3, 8


def write(out_dir: Path, base_dir: Path) -> None:
    g = torch.Generator().manual_seed(303)
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_in, d_out) in linear_shapes(base_dir).items():
        p = PEFT_PREFIX + module
        for e in range(NUM_EXPERTS):
            a = randn(g, RANK // NUM_EXPERTS, d_in, std=0.2)
            b = randn(g, d_out, RANK // NUM_EXPERTS, std=0.05)
            tensors[f"{p}.lora_A.loraA.{e}.mlp.weight"], tensors[f"{p}.lora_A.loraA.{e}.weight"] = a, a
            tensors[f"{p}.lora_B.loraB.{e}.mlp.weight"], tensors[f"{p}.lora_B.loraB.{e}.weight"] = b, b
        tensors[f"{p}.lora_task_embedding.weight"] = randn(g, TASKS + 1, TASK_DIM, std=1.0)
        tensors[f"{p}.lora_gate.GateL.weight"] = randn(g, NUM_EXPERTS, TASK_DIM, std=1.0)
    tensors["lora_task_embedding.weight"] = randn(g, TASKS + 1, TASK_DIM, std=1.0)
    tensors["lora_gate.GateL.weight"] = randn(g, NUM_EXPERTS, TASK_DIM, std=1.0)
    save_bin(out_dir, tensors)
    write_config(
        out_dir,
        {
            "peft_type": "MMOELORAS",
            "task_type": "CAUSAL_LMS",
            "base_model_name_or_path": BASE_REL,
            "r": RANK,
            "lora_alpha": 32,
            "lora_dropout": 0.1,
            "expert_num": NUM_EXPERTS,
            "task_num": TASKS,
            "task_embedding_dim": TASK_DIM,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "fan_in_fan_out": False,
            "bias": "none",
            "modules_to_save": None,
            "inference_mode": True,
        },
    )
