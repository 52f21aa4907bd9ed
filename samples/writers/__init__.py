"""Sample checkpoint writers: one module per family, each exposing `write(out_dir, base_dir) -> None`.

`samples/make_samples.py` runs every module of this package (sorted by name) with
`out_dir = samples/<module name>` and `base_dir = samples/<BASE>`, where a module's optional `BASE`
names the base model (default tiny-llama; tiny-mistral, tiny-qwen2 and tiny-llama3 are the other bases). A writer
saves the family's own on-disk layout (file names, key names, config fields) with random, non-zero,
seeded weights, the way its training code saves them (`save_bin(trained=True)`: live parameters that
come back from `torch.load` with requires_grad; `save_safetensors(dtype=torch.bfloat16)`: a bf16 run);
this module holds the pieces they share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

BASE_REL = "../tiny-llama"  # base_model_name_or_path, resolved against the checkpoint directory
PEFT_PREFIX = "base_model.model."
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def linear_shapes(base_dir: Path, projections: tuple[str, ...] = PROJECTIONS) -> dict[str, tuple[int, int]]:
    """{module path: (D_in, D_out)} for every target projection of every decoder layer of the base model."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, int]] = {}
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as f:
        for key in sorted(f.keys()):
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module.split(".layers.")[-1].split(".", 1)[-1] in projections:
                d_out, d_in = f.get_slice(key).get_shape()
                shapes[module] = (d_in, d_out)
    return dict(sorted(shapes.items(), key=lambda kv: (int(kv[0].split(".layers.")[1].split(".")[0]), kv[0])))


def randn(generator: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    """Seeded normal weights (never zero, so every path changes the output)."""
    return torch.randn(*shape, generator=generator) * std


def mean_input_directions(base_dir: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    """Unit vectors along the mean input of each module, over the built-in calibration text (fp64 forward).

    Trained routers often collapse onto one expert: their row for it lines up with a direction the layer's
    inputs share (attention outputs and MLP activations have one), so that expert wins on nearly every token.
    A router row along these directions reproduces that. Computed in float64 so that a rerun on any machine
    gives the same bits once rounded to the sample's dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_export.merging.calibration_text import builtin_lines

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, torch.zeros(x.shape[-1], dtype=torch.float64)) + x.sum(0)

        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in modules]
    with torch.no_grad():
        for line in builtin_lines():
            model(input_ids=tokenizer(line, return_tensors="pt").input_ids[:, :64])
    for handle in handles:
        handle.remove()
    return {name: (total / total.norm()).float() for name, total in sums.items()}


def write_config(out_dir: Path, config: dict[str, Any], name: str = "adapter_config.json") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def base_rel(base_dir: Path) -> str:
    """base_model_name_or_path of a sample: its base model's directory, relative to the checkpoint."""
    return f"../{base_dir.name}"


def save_safetensors(
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    name: str = "adapter_model.safetensors",
    dtype: torch.dtype | None = None,
) -> None:
    """safetensors as `save_pretrained` writes it; `dtype` casts every tensor (a run trained in bf16 saves bf16)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    cast = {k: (v if dtype is None else v.to(dtype)).contiguous().clone() for k, v in tensors.items()}
    save_file(cast, str(out_dir / name), metadata={"format": "pt"})


def save_bin(
    out_dir: Path, tensors: dict[str, torch.Tensor], name: str = "adapter_model.bin", trained: bool = False
) -> None:
    """torch.save of a flat dict of tensors, as the research code bases write adapter_model.bin.

    `trained=True` saves what MoE-PEFT's `save_adapter_weight` saves: the live `nn.Parameter`s of the
    model, which `torch.load` hands back with `requires_grad=True`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if trained:
        data = {k: torch.nn.Parameter(v.contiguous().clone(), requires_grad=True) for k, v in tensors.items()}
    else:
        data = {k: v.contiguous() for k, v in tensors.items()}
    torch.save(data, str(out_dir / name))
