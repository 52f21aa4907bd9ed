"""LoRAMoE (Ablustrund/LoRAMoE): E LoRA experts per MLP linear, mixed densely by a per-linear router.

Layout (reference/formats.md section 6): vendored-peft `adapter_model.bin` + `adapter_config.json`
(`peft_type: LORA`, `lora_nums` = E), keys under `base_model.model.` with no adapter-name component:
    {module}.lora_A{e}.weight [R, D_in], {module}.lora_B{e}.weight [D_out, R], {module}.lora_route.weight [E, D_in]
Forward: `y = W x + b + sum_e p_e (alpha / r) B_e A_e x`, `p = softmax(G x, dtype=fp32).to(y.dtype)` with
G x in the model dtype: dense, no top-k, no renormalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from moe_export.errors import FormatError
from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.common import expert_pairs, require_int, sorted_modules, split_module_keys, stack_experts
from moe_export.formats.registry import Family, LoadOptions, register
from moe_export.ir import Adapter, ExpertStack, LinearMoE, Router, rank_scaling

StackBuilder = Callable[[str, dict[str, torch.Tensor], float], ExpertStack]
# Key tails after `{module}.` -> part names; `e` is the expert index (HydraLoRA adds a shared `lora_A`).
PARTS: dict[str, str | None] = {
    r"lora_A(?P<e>\d+)\.weight": "A",
    r"lora_B(?P<e>\d+)\.weight": "B",
    r"lora_route\.weight": "route",
}


def routed_units(
    ckpt: Checkpoint, family: str, parts: dict[str, str | None], build_stack: StackBuilder
) -> list[LinearMoE]:
    """One dense, model-dtype-routed LinearMoE per module; `build_stack` turns its parts into experts."""
    cfg = ckpt.require_config("r", "lora_alpha")
    where = str(ckpt.config_path)
    rank = require_int(cfg, "r", where)
    alpha = cfg["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise FormatError(f"{where}: 'lora_alpha' is {alpha!r}, expected a positive number")
    scaling = rank_scaling(float(alpha), rank)
    declared = require_int(cfg, "lora_nums", where) if "lora_nums" in cfg else None
    modules = split_module_keys(ckpt.tensors, parts, str(ckpt.weights_path), family)
    units = []
    for module in sorted_modules(modules):
        found = modules[module]
        if "route" not in found:
            raise FormatError(f"{ckpt.weights_path}: {module} has LoRA experts but no lora_route.weight")
        stack = build_stack(module, found, scaling)
        if stack.rank != rank:
            raise FormatError(f"{ckpt.weights_path}: {module} has rank {stack.rank}, {where} says r={rank}")
        if declared is not None and declared != stack.num_experts:
            raise FormatError(f"{where}: lora_nums={declared}, but {module} holds {stack.num_experts} experts")
        # Routed in the model dtype: softmax(G x, dtype=float32).to(y.dtype) (formats.md sections 5, 6).
        router = Router(
            "linear", stack.num_experts, "dense", renormalize=False, compute_dtype="model", weight=found["route"]
        )
        units.append(LinearMoE(module, stack.A.shape[2], stack.B.shape[1], stack, router))
    return units


def _separate_a(module: str, parts: dict[str, torch.Tensor], scaling: float) -> ExpertStack:
    a_list, b_list = expert_pairs(parts, module)
    return stack_experts(module, a_list, b_list, scaling)


@register
class LoRAMoE(Family):
    name: ClassVar[str] = "loramoe"
    title: ClassVar[str] = "LoRAMoE"
    source: ClassVar[str] = "Ablustrund/LoRAMoE @ 1177288 (peft/tuners/lora.py Linear)"
    key_patterns: ClassVar[tuple[str, ...]] = (r"\.lora_route\.weight$", r"\.lora_A\d+\.weight$")
    peft_types: ClassVar[tuple[str, ...]] = ("LORA",)  # its vendored old peft writes LORA, or nothing
    peft_type_required: ClassVar[bool] = False
    specificity: ClassVar[int] = 20  # above plain LoRA (which forbids lora_route anyway)

    @classmethod
    def load(cls, ckpt: Checkpoint, options: LoadOptions, base: BaseWeights | None) -> Adapter:
        units = routed_units(ckpt, cls.title, PARTS, _separate_a)
        return Adapter(cls.name, list(units), source_config=ckpt.config or {})
