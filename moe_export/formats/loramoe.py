"""LoRAMoE (Ablustrund/LoRAMoE): E LoRA experts per MLP linear, mixed densely by a per-linear router.

Layout (docs/formats.md, "loramoe"): vendored-peft `adapter_model.bin` + `adapter_config.json`
(`peft_type: LORA`, `lora_nums` = E), keys under `base_model.model.` with no adapter-name component:
    {module}.lora_A{e}.weight [R, D_in], {module}.lora_B{e}.weight [D_out, R], {module}.lora_route.weight [E, D_in]
Forward: `y = W x + b + sum_e p_e (alpha / r) B_e A_e x`, `p = softmax(G x, dtype=fp32).to(y.dtype)` with
G x in the model dtype: dense, no top-k, no renormalisation.
Layout source: Ablustrund/LoRAMoE @ 1177288 (peft/tuners/lora.py Linear).
"""

from __future__ import annotations

import torch

from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.common import expert_pairs, old_peft_signature, routed_units, stack_experts
from moe_export.formats.registry import Family, register
from moe_export.ir import Adapter, ExpertStack

# Key tails after `{module}.` -> part names; `e` is the expert index (HydraLoRA adds a shared `lora_A`).
PARTS: dict[str, str | None] = {
    r"lora_A(?P<e>\d+)\.weight": "A",
    r"lora_B(?P<e>\d+)\.weight": "B",
    r"lora_route\.weight": "route",
}


def _separate_a(module: str, parts: dict[str, torch.Tensor], scaling: float) -> ExpertStack:
    a_list, b_list = expert_pairs(parts, module)
    return stack_experts(module, a_list, b_list, scaling)


@register
class LoRAMoE(Family):
    name = "loramoe"
    title = "LoRAMoE"
    signature = old_peft_signature(keys=(r"\.lora_route\.weight$", r"\.lora_A\d+\.weight$"))

    @classmethod
    def load(cls, ckpt: Checkpoint, base: BaseWeights | None) -> Adapter:
        units = routed_units(ckpt, cls.title, PARTS, _separate_a)
        return Adapter(cls.name, list(units), source_config=ckpt.config or {})
