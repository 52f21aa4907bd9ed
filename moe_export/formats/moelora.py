"""MoELoRA (Luo et al. 2024, arXiv 2402.12851): per-linear top-k MoE-LoRA in a PEFT-style layout.

The authors publish no code or checkpoint format (docs/formats.md, "moelora"), so moe-export
defines one, following PEFT's conventions:

    adapter_config.json: {"peft_type": "MOELORA", "num_experts": E, "top_k": K, "r": R (per expert),
                          "lora_alpha": alpha, "use_rslora": false, "base_model_name_or_path": ...}
    adapter_model.safetensors (or .bin), for every adapted linear P (e.g. model.layers.0.self_attn.q_proj):
        base_model.model.P.lora_A.{e}.weight   [R, D_in]    e = 0..E-1
        base_model.model.P.lora_B.{e}.weight   [D_out, R]
        base_model.model.P.lora_router.weight  [E, D_in]    (no bias)

Forward (the paper's equations, as in the third-party re-implementation yukiDuan/MoELoRA-CL):
p = softmax(G x) in fp32, top-k, renormalised; y = W x + sum_j w_j (alpha / R) B_j A_j x. No base change.
"""

from __future__ import annotations

from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.common import (
    expert_linear,
    peft_expert_modules,
    require_bool,
    require_float,
    require_int,
    softmax_topk_router,
)
from moe_export.formats.registry import Family, Signature, register
from moe_export.ir import Adapter, rank_scaling


@register
class MoELoRA(Family):
    name = "moelora"
    title = "MoELoRA (Luo et al.)"
    signature = Signature(("MOELORA",), keys=(r"\.lora_router\.weight$", r"\.lora_A\.\d+\.weight$"))

    @classmethod
    def load(cls, ckpt: Checkpoint, base: BaseWeights | None) -> Adapter:
        config = ckpt.require_config("r", "lora_alpha", "num_experts", "top_k")
        where = str(ckpt.config_path)
        rank, num_experts = require_int(config, "r", where), require_int(config, "num_experts", where)
        top_k = require_int(config, "top_k", where)
        scaling = rank_scaling(
            require_float(config, "lora_alpha", where), rank, require_bool(config, "use_rslora", where)
        )
        units = []
        for module, a_list, b_list, router in peft_expert_modules(ckpt, cls.title, "lora_router", num_experts, rank):
            units.append(expert_linear(module, a_list, b_list, scaling, softmax_topk_router(router, top_k)))
        return Adapter(family=cls.name, units=units, source_config={"adapter_config": config})
