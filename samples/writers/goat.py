"""GOAT sample: peft 0.14 layout (adapter_model.safetensors) as Facico/GOAT-PEFT saves it.

E=4 experts of rank 2 (config r=8 is the total rank), top-2, init_type goat, init_cof 1/E.
Like peft, the file also carries the `moe_layer.experts.{e}` clones of every expert matrix.
Saved in bf16, as a run trained in bf16 saves it (samples/goat is the README's quick start, so the
quick start exercises a bf16 adapter on an fp32 base); `dtype=None` keeps fp32.
The routers of the `collapsed` projections (o_proj and down_proj by default) collapsed onto expert 0, as
trained routers often do (see `mean_input_directions`); the others are mixed, so the quick start's
`--merge-threshold 0.9` merges some units and keeps the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from samples.writers import (
    PEFT_PREFIX,
    base_rel,
    linear_shapes,
    mean_input_directions,
    randn,
    save_safetensors,
    write_config,
)

COLLAPSED_SCALE = 20.0  # router logit of the collapsed expert per unit of cosine with the mean input


def write(
    out_dir: Path,
    base_dir: Path,
    init_type: str = "goat",
    num_experts: int = 4,
    rank: int = 8,
    dtype: torch.dtype | None = torch.bfloat16,
    seed: int = 101,
    collapsed: tuple[str, ...] = ("o_proj", "down_proj"),
) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    shapes = linear_shapes(base_dir)
    directions = mean_input_directions(base_dir, [m for m in shapes if m.endswith(collapsed)]) if collapsed else {}
    for module, (d_in, d_out) in shapes.items():
        p = PEFT_PREFIX + module
        for e in range(num_experts):
            a = randn(g, rank // num_experts, d_in, std=0.2)
            b = randn(g, d_out, rank // num_experts, std=0.012)
            tensors[f"{p}.lora_A.{e}.weight"], tensors[f"{p}.lora_B.{e}.weight"] = a, b
            tensors[f"{p}.moe_layer.experts.{e}.lora_A.weight"] = a.clone()
            tensors[f"{p}.moe_layer.experts.{e}.lora_B.weight"] = b.clone()
        router = randn(g, num_experts, d_in, std=0.5)
        if module in directions:
            router[0] = COLLAPSED_SCALE * directions[module]
        tensors[f"{p}.lora_gating.weight"] = router
    save_safetensors(out_dir, tensors, dtype=dtype)
    write_config(
        out_dir,
        {
            "peft_type": "GOAT",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_rel(base_dir),
            "r": rank,
            "lora_alpha": 16,
            "lora_dropout": 0.05,
            "num_experts": num_experts,
            "top_k": 2,
            "init_type": init_type,
            "init_cof": 1.0 / num_experts,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in linear_shapes(base_dir)}),
            "use_rslora": False,
            "bias": "none",
            "inference_mode": True,
        },
    )
