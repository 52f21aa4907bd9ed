"""HydraLoRA (Clin0212/HydraLoRA): one shared A and E B heads per linear, mixed densely by a router.

Layout (docs/formats.md, "hydralora"): vendored-peft `adapter_model.bin` + `adapter_config.json`
(`peft_type: LORA`, `lora_nums` = E), keys under `base_model.model.`:
    {module}.lora_A.weight [R, D_in] (shared), {module}.lora_B{e}.weight [D_out, R], {module}.lora_route.weight [E, D_in]
Forward: `y = W x + b + sum_e p_e (alpha / r) B_e A x`, `p = softmax(G x, dtype=fp32).to(y.dtype)`.
The canonical stack has E_A = 1.
Layout source: Clin0212/HydraLoRA @ afb693b (peft/tuners/lora.py Linear).
"""

from __future__ import annotations

import torch

from moe_export.errors import FormatError
from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.common import indexed, old_peft_signature, routed_units, stack_experts
from moe_export.formats.registry import Family, register
from moe_export.ir import Adapter, ExpertStack

PARTS: dict[str, str | None] = {
    r"lora_A\.weight": "A",
    r"lora_B(?P<e>\d+)\.weight": "B",
    r"lora_route\.weight": "route",
}


def _shared_a(module: str, parts: dict[str, torch.Tensor], scaling: float) -> ExpertStack:
    if "A" not in parts:
        raise FormatError(f"{module}: HydraLoRA needs one shared lora_A.weight, found {sorted(parts)}")
    b_list = indexed(parts, "B", module)
    stack = stack_experts(module, [parts["A"]] * len(b_list), b_list, scaling)  # checks the B shapes agree
    return ExpertStack(stack.A[:1], stack.B, stack.scaling)  # A [1, R, D_in]: shared by every head


@register
class HydraLoRA(Family):
    name = "hydralora"
    title = "HydraLoRA"
    signature = old_peft_signature(
        keys=(r"\.lora_route\.weight$", r"\.lora_A\.weight$", r"\.lora_B\d+\.weight$"),
        forbidden=(r"\.lora_A\d+\.weight$",),  # LoRAMoE's per-expert A
    )

    @classmethod
    def load(cls, ckpt: Checkpoint, base: BaseWeights | None) -> Adapter:
        units = routed_units(ckpt, cls.title, PARTS, _shared_a)
        return Adapter(cls.name, list(units), source_config=ckpt.config or {})
