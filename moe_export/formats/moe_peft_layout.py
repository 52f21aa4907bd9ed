"""The MoE-PEFT on-disk layout (TUDB-Labs/MoE-PEFT `get_lora_layer_weight`), read by two family modules.

moe_peft.py (MoLA, LoRAMoE) and mixlora.py (MixLoRA) save through the same code, so their key parsing,
config checks and expert stacking live here once (docs/formats.md, "MoE-PEFT layout"). Key grammar:
    {prefix}.layers.{i}.{self_attn|mlp}.{proj}.moe_gate.weight                 [E, D_in]
    {prefix}.layers.{i}.{self_attn|mlp}.{proj}.experts.{e}.lora_A|lora_B.weight [R, D_in] / [D_out, R]
    {prefix}.layers.{i}.{self_attn|mlp}.{proj}.lora_A|lora_B.weight            plain always-on LoRA
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_export.errors import FormatError
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.common import require_bool, stack_experts
from moe_export.formats.registry import Signature
from moe_export.ir import ExpertStack, LinearMoE, Router, SharedLoRA, Unit, rank_scaling

KEY_RX = re.compile(
    r"(?P<prefix>[a-z]+)\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\."
    r"(?:(?P<block_gate>moe_gate)|(?P<proj>\w+?)\.(?:(?P<gate>moe_gate)|experts\.(?P<expert>\d+)\.lora_(?P<ea>[AB])"
    r"|lora_(?P<la>[AB])))\.weight"
)
CAUSAL_TASKS = (None, "CAUSAL_LM", "QUESTION_ANS")


@dataclass
class ModuleWeights:
    """What one targeted linear holds: router, experts {e: {A, B}}, plain LoRA {A, B}."""

    gate: torch.Tensor | None = None
    experts: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    lora: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MoePeftWeights:
    """A MoE-PEFT state dict parsed by module: per-linear weights and MixLoRA's per-block routers."""

    modules: dict[str, ModuleWeights]  # HF module path, e.g. model.layers.0.mlp.up_proj
    block_gates: dict[int, torch.Tensor]  # layer -> [E, D] (MixLoRA)


def parse_state_dict(ckpt: Checkpoint, prefix: str) -> MoePeftWeights:
    """Group every `{prefix}.layers...` key by module; any other key is an error naming it."""
    modules: dict[str, ModuleWeights] = {}
    block_gates: dict[int, torch.Tensor] = {}
    unknown = []
    for key, tensor in ckpt.tensors.items():
        m = KEY_RX.fullmatch(key)
        if m is None or m.group("prefix") != prefix:
            unknown.append(key)
            continue
        layer = int(m.group("layer"))
        if m.group("block_gate"):
            if m.group("block") != "mlp":
                unknown.append(key)
                continue
            block_gates[layer] = tensor
            continue
        module = modules.setdefault(f"model.layers.{layer}.{m.group('block')}.{m.group('proj')}", ModuleWeights())
        if m.group("gate"):
            module.gate = tensor
        elif m.group("expert") is not None:
            module.experts.setdefault(int(m.group("expert")), {})[m.group("ea")] = tensor
        else:
            module.lora[m.group("la")] = tensor
    if unknown:
        hint = (
            " (a sequence-classification head: only causal LM adapters are exported)" if "classifier" in unknown else ""
        )
        raise FormatError(
            f"{ckpt.weights_path}: unexpected keys {sorted(unknown)[:5]}{hint}; not a MoE-PEFT {prefix} layout"
        )
    return MoePeftWeights(modules, block_gates)


def lora_scaling(cfg: dict[str, Any], where: str) -> tuple[int, float]:
    """(r, scaling) of a MoE-PEFT LoraConfig dict: alpha / r, or alpha / sqrt(r) with use_rslora."""
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise FormatError(f"{where}: 'r' ({rank!r}) and 'lora_alpha' ({alpha!r}) must be positive numbers")
    return rank, rank_scaling(float(alpha), rank, require_bool(cfg, "use_rslora", where))


def layout_signature(prefix: str) -> Signature:
    """Keys `{prefix}.layers.N...`; the peft_type, which MoE-PEFT may leave out, is the prefix in upper case."""
    return Signature((prefix.upper(),), keys=(rf"^{prefix}\.layers\.\d+\.",), peft_type_required=False)


def topk_routing(cfg: dict[str, Any], default_top_k: int | None, where: str) -> dict[str, Any]:
    """Router fields of MoE-PEFT's top-k routing (MixLoRA, MoLA): renormalised; `top_k` absent -> the default."""
    top_k = cfg.get("top_k", default_top_k)
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise FormatError(f"{where}: top_k must be one integer, got {top_k!r}")
    return {"select": "topk", "top_k": top_k, "renormalize": True}


def check_config(ckpt: Checkpoint, peft_type: str, *keys: str) -> dict[str, Any]:
    """The adapter_config.json, checked: the right peft_type, the needed keys, a causal-LM task."""
    cfg = ckpt.require_config("r", "lora_alpha", *keys)
    where = ckpt.config_path
    declared = str(cfg.get("peft_type", peft_type)).upper()
    if declared != peft_type:
        raise FormatError(f"{where}: peft_type is {declared!r}, expected {peft_type!r}")
    if cfg.get("task_type") not in CAUSAL_TASKS:
        raise FormatError(f"{where}: task_type {cfg['task_type']!r} is not supported (only CAUSAL_LM / QUESTION_ANS)")
    for flag in ("use_dora", "use_rslora"):
        require_bool(cfg, flag, str(where))
    return cfg


def dora_notice(cfg: dict[str, Any]) -> list[str]:
    if not cfg.get("use_dora"):  # a bool: checked in check_config
        return []
    # MoE-PEFT does not save DoRA magnitudes; it recomputes them from W + sBA at load, so the DoRA
    # rescale is exactly 1 and the adapter computes as plain LoRA.
    return ["use_dora: MoE-PEFT saves no DoRA magnitudes and recomputes them at load, so DoRA acts as plain LoRA"]


def expert_stack(module: str, weights: ModuleWeights, rank: int, scaling: float, where: str) -> ExpertStack:
    """Stack experts 0..E-1 of one module, checking indices, pairs and the configured rank."""
    if sorted(weights.experts) != list(range(len(weights.experts))):
        raise FormatError(f"{where}: {module} has experts {sorted(weights.experts)}, expected 0..E-1")
    a_list, b_list = [], []
    for e in range(len(weights.experts)):
        pair = weights.experts[e]
        if set(pair) != {"A", "B"}:
            raise FormatError(f"{where}: {module}.experts.{e} lacks lora_{({'A', 'B'} - set(pair)).pop()}.weight")
        a_list.append(pair["A"])
        b_list.append(pair["B"])
    stack = stack_experts(module, a_list, b_list, scaling)
    if stack.rank != rank:
        raise FormatError(f"{where}: {module} experts have rank {stack.rank}, adapter_config.json says r={rank}")
    return stack


def plain_lora(module: str, weights: ModuleWeights, rank: int, scaling: float, where: str) -> list[SharedLoRA]:
    if not weights.lora:
        return []
    if set(weights.lora) != {"A", "B"}:
        raise FormatError(
            f"{where}: {module} has a LoRA without its lora_{({'A', 'B'} - set(weights.lora)).pop()}.weight"
        )
    a, b = weights.lora["A"], weights.lora["B"]
    if a.shape[0] != rank or b.shape[1] != rank:
        raise FormatError(f"{where}: {module} LoRA has rank {a.shape[0]}, adapter_config.json says r={rank}")
    return [SharedLoRA(a, b, scaling)]


def check_num_experts(cfg: dict[str, Any], found: int, module: str, where: str) -> int:
    declared = cfg.get("num_experts")
    if not isinstance(declared, int) or isinstance(declared, bool):
        raise FormatError(
            f"{where}: num_experts must be one integer (MoE-PEFT has no per-layer counts), got {declared!r}"
        )
    if declared != found:
        raise FormatError(f"{where}: says {declared} experts, {module} holds {found}; check the checkpoint")
    return declared


def linear_units(
    ckpt: Checkpoint, parsed: MoePeftWeights, cfg: dict[str, Any], make_router: Callable[[int, torch.Tensor], Router]
) -> list[Unit]:
    """One LinearMoE per targeted linear: routed experts where a moe_gate is saved, plain LoRA otherwise."""
    where = str(ckpt.path)
    rank, scaling = lora_scaling(cfg, str(ckpt.config_path))
    units: list[Unit] = []
    for module in sorted(parsed.modules, key=_module_order):
        weights = parsed.modules[module]
        shared = plain_lora(module, weights, rank, scaling, where)
        stack = router = None
        if weights.gate is not None or weights.experts:
            if weights.gate is None:
                raise FormatError(f"{where}: {module} has experts but no moe_gate.weight")
            stack = expert_stack(module, weights, rank, scaling, where)
            check_num_experts(cfg, stack.num_experts, module, str(ckpt.config_path))
            router = make_router(stack.num_experts, weights.gate.float())  # MoE-PEFT routes in fp32
        if stack is not None:
            d_in, d_out = stack.A.shape[2], stack.B.shape[1]
        else:
            d_in, d_out = shared[0].A.shape[1], shared[0].B.shape[0]
        units.append(LinearMoE(module, d_in, d_out, stack, router, shared))
    return units


def _module_order(module: str) -> tuple[int, str]:
    return (int(module.split(".")[2]), module)
