"""MoE-PEFT (TUDB-Labs/MoE-PEFT) checkpoints: MoLA and LoRAMoE with per-linear routers.

Layout (docs/formats.md, "MoE-PEFT layout"): `adapter_model.bin`
(torch.save of a flat fp32 dict) + `adapter_config.json` (`LoraConfig.export()`), keys
    {prefix}.layers.{i}.{self_attn|mlp}.{proj}.moe_gate.weight                 [E, D_in]
    {prefix}.layers.{i}.{self_attn|mlp}.{proj}.experts.{e}.lora_A|lora_B.weight [R, D_in] / [D_out, R]
    {prefix}.layers.{i}.{self_attn|mlp}.{proj}.lora_A|lora_B.weight            plain always-on LoRA
MoLA routes every targeted linear top-k (renormalised); LoRAMoE routes the MLP linears densely and gives
the attention linears a plain LoRA. Both route in fp32. The key parsing (moe_peft_layout.py) is shared with MixLoRA.
Layout source: TUDB-Labs/MoE-PEFT 2.0.2 (moe_peft/model.py get_lora_layer_weight).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.moe_peft_layout import (
    check_config,
    dora_notice,
    layout_signature,
    linear_units,
    parse_state_dict,
    topk_routing,
)
from moe_export.formats.registry import Family, register
from moe_export.ir import Adapter, Router


class _MoePeftFamily(Family):
    """Both families load the same way; a subclass supplies its key prefix and its routing (`router_fields`)."""

    prefix: ClassVar[str]  # the state dict's first key component, e.g. "mola"

    @classmethod
    def router_fields(cls, cfg: dict[str, Any], where: str) -> dict[str, Any]:
        """The Router fields (select, top_k, renormalize) every routed linear gets, from the checked config."""
        raise NotImplementedError

    @classmethod
    def load(cls, ckpt: Checkpoint, base: BaseWeights | None) -> Adapter:
        cfg = check_config(ckpt, cls.signature.peft_types[0], "num_experts")
        fields = cls.router_fields(cfg, str(ckpt.config_path))

        def router(num_experts: int, weight: torch.Tensor) -> Router:
            return Router("linear", num_experts, weight=weight, **fields)

        units = linear_units(ckpt, parse_state_dict(ckpt, cls.prefix), cfg, router)
        return Adapter(cls.name, units, source_config=cfg, notices=dora_notice(cfg))


@register
class MoePeftMola(_MoePeftFamily):
    name = "moe_peft_mola"
    title = "MoE-PEFT MoLA"
    prefix = "mola"
    signature = layout_signature(prefix)
    default_top_k = 2  # MolaConfig.from_config default

    @classmethod
    def router_fields(cls, cfg: dict[str, Any], where: str) -> dict[str, Any]:
        return topk_routing(cfg, cls.default_top_k, where)


@register
class MoePeftLoraMoE(_MoePeftFamily):
    name = "moe_peft_loramoe"
    title = "MoE-PEFT LoRAMoE"
    prefix = "loramoe"
    signature = layout_signature(prefix)

    @classmethod
    def router_fields(cls, cfg: dict[str, Any], where: str) -> dict[str, Any]:
        return {"select": "dense", "renormalize": False}
