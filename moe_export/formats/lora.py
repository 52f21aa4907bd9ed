"""Plain PEFT LoRA: every adapted linear is one always-on LoRA (the degenerate E = 1 case, no router).

Keys `base_model.model.<module>.lora_A.weight` [R, D_in] / `.lora_B.weight` [D_out, R]; scaling
alpha / R, or alpha / sqrt(R) with `use_rslora`; PEFT's `rank_pattern` / `alpha_pattern` give
per-module values (the rank is read from the tensors, alpha from the pattern that matches).
Layout source: huggingface/peft LoraConfig (adapter_model.safetensors or .bin).
"""

from __future__ import annotations

import re
from typing import Any

from moe_export.errors import FormatError
from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.common import require_bool, split_module_keys
from moe_export.formats.registry import Family, Signature, register
from moe_export.ir import Adapter, LinearMoE, SharedLoRA, rank_scaling

PARTS: dict[str, str | None] = {r"lora_A\.weight": "A", r"lora_B\.weight": "B"}


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first pattern key `k` with re.match(f'.*\\.{k}$', module)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


@register
class Lora(Family):
    name = "lora"
    title = "LoRA (PEFT)"
    signature = Signature(
        ("LORA",),
        keys=(r"\.lora_A\.weight$", r"\.lora_B\.weight$"),
        # Families that also say peft_type LORA but add experts or routers (MoLA, LoRAMoE, HydraLoRA, MoE-PEFT).
        forbidden=(
            r"\.lora_route\.weight$",
            r"\.lora_[AB]_?\d+\.weight$",
            r"\.router\.router\.weight$",
            r"\.lora_(router|gating)\.weight$",
            r"\.moe_gate\.weight$",
            r"\.experts\.\d+\.lora_[AB]\.weight$",
            r"^(mixlora|mola|loramoe)\.",
        ),
    )
    specificity = 5

    @classmethod
    def load(cls, ckpt: Checkpoint, base: BaseWeights | None) -> Adapter:
        config = ckpt.require_config("lora_alpha")
        where = str(ckpt.config_path)
        if require_bool(config, "use_dora", where):
            raise FormatError(f"{where}: use_dora is set; DoRA adapters are not supported (merge them with PEFT first)")
        rslora = require_bool(config, "use_rslora", where)
        alpha_pattern = config.get("alpha_pattern") or {}
        units = []
        for module, parts in split_module_keys(ckpt.tensors, PARTS, str(ckpt.weights_path), cls.title).items():
            if set(parts) != {"A", "B"}:
                raise FormatError(f"{ckpt.weights_path}: {module} has {sorted(parts)}, a LoRA needs lora_A and lora_B")
            a, b = parts["A"], parts["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise FormatError(
                    f"{ckpt.weights_path}: {module} lora_A{tuple(a.shape)} and lora_B{tuple(b.shape)} do not chain"
                )
            alpha = float(pattern_value(alpha_pattern, module, config["lora_alpha"]))
            shared = SharedLoRA(A=a, B=b, scaling=rank_scaling(alpha, a.shape[0], rslora), origin="lora")
            units.append(LinearMoE(module, a.shape[1], b.shape[0], shared=[shared]))
        return Adapter(family=cls.name, units=units, source_config={"adapter_config": config})
