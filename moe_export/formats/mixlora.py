"""MixLoRA (TUDB-Labs/MixLoRA, checkpoints written by MoE-PEFT): one router per MLP block.

Layout (docs/formats.md, "mixlora"): `adapter_model.bin` + `adapter_config.json` with
`peft_type: MIXLORA`, keys
    mixlora.layers.{i}.mlp.moe_gate.weight                                  [E, D] block router
    mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_A|lora_B.weight          per-expert LoRA of gate/up/down
    mixlora.layers.{i}.self_attn.{proj}.lora_A|lora_B.weight                always-on attention LoRA
Each MLP block becomes an `FFNMoE` unit; each attention LoRA a `LinearMoE` with one `SharedLoRA`.
Expert LoRAs follow `expert_lora` when the config has it (MoE-PEFT semantics; mixlora 0.2.3's own
loader ignores it and uses the top-level r / lora_alpha).
Layout source: TUDB-Labs/MoE-PEFT 2.0.2 adapters/mixlora (read by mixlora 0.2.3).
"""

from __future__ import annotations

from typing import Any

from moe_export.errors import FormatError
from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.moe_peft_layout import (
    ModuleWeights,
    check_config,
    check_num_experts,
    dora_notice,
    expert_stack,
    layout_signature,
    lora_scaling,
    parse_state_dict,
    plain_lora,
    topk_routing,
)
from moe_export.formats.registry import Family, register
from moe_export.ir import Adapter, FFNMoE, LinearMoE, Router, Unit

# MLP projection names -> the FFNMoE layout they belong to (the reference supports llama_gated).
MLP_ARCHS = {"gate_proj": "llama_gated", "up_proj": "llama_gated", "down_proj": "llama_gated"}


def routing(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Router fields for `routing_strategy` (MixLoraConfig.from_config defaults for absent keys)."""
    strategy = cfg.get("routing_strategy")
    if strategy == "mixlora":
        return topk_routing(cfg, MixLoRA.default_top_k, where)
    if strategy == "mixlora-dynamic":
        top_p, temperature = cfg.get("top_p", 0.8), cfg.get("temperature", 0.0)
        if not isinstance(top_p, (int, float)) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise FormatError(f"{where}: top_p ({top_p!r}) and temperature ({temperature!r}) must be numbers >= 0")
        # The kept probabilities are NOT renormalised (docs/formats.md, "mixlora"); keep that quirk.
        return {"select": "top_p", "top_p": float(top_p), "temperature": float(temperature), "renormalize": False}
    if strategy == "mixlora-switch":
        raise FormatError(
            f"{where}: routing_strategy 'mixlora-switch' is not supported: its expert capacity makes a token's output "
            "depend on the other tokens of the sequence, and MoE-PEFT's inference path returns the block input unchanged"
        )
    if strategy == "mixtral":
        raise FormatError(
            f"{where}: legacy MixLoRA layout (routing_strategy 'mixtral'); convert it with MixLoRA's "
            "misc/legacy_weights_convertor.py first"
        )
    raise FormatError(f"{where}: unknown routing_strategy {strategy!r} (mixlora or mixlora-dynamic)")


def expert_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The LoRA config of the experts: the top-level config updated by `expert_lora` (MoE-PEFT)."""
    merged = dict(cfg)
    merged.update(cfg.get("expert_lora") or {})
    return merged


@register
class MixLoRA(Family):
    name = "mixlora"
    title = "MixLoRA"
    signature = layout_signature("mixlora")
    default_top_k = 2
    needs_base_weights = True  # only its config.json: hidden_act when act_fn is not saved

    @classmethod
    def load(cls, ckpt: Checkpoint, base: BaseWeights | None) -> Adapter:
        cfg = check_config(ckpt, "MIXLORA", "num_experts", "routing_strategy")
        where = str(ckpt.config_path)
        router_fields = routing(cfg, where)
        if ckpt.has_key(r"^mixlora\.layers\.\d+\.gate\.weight$"):
            raise FormatError(
                f"{ckpt.weights_path}: legacy MixLoRA keys (layers.N.gate); convert with misc/legacy_weights_convertor.py"
            )
        act_fn = cfg.get("act_fn") or _base_hidden_act(base, where)
        parsed = parse_state_dict(ckpt, "mixlora")
        rank, scaling = lora_scaling(cfg, where)
        expert_rank, expert_scaling = lora_scaling(expert_config(cfg), f"{where} (expert_lora)")
        units: list[Unit] = []
        blocks: dict[int, dict[str, ModuleWeights]] = {}
        for module, weights in sorted(parsed.modules.items()):
            layer, block, proj = module.split(".")[2:]
            if block == "self_attn":
                if weights.gate is not None or weights.experts:
                    raise FormatError(f"{ckpt.weights_path}: {module} has experts; MixLoRA routes only MLP blocks")
                shared = plain_lora(module, weights, rank, scaling, str(ckpt.path))
                units.append(LinearMoE(module, shared[0].A.shape[1], shared[0].B.shape[0], shared=shared))
                continue
            if proj not in MLP_ARCHS:
                raise FormatError(
                    f"{ckpt.weights_path}: MLP projection {proj!r} of {module}: only gate/up/down_proj MLPs are supported"
                )
            if weights.gate is not None or weights.lora:
                raise FormatError(
                    f"{ckpt.weights_path}: {module} has a per-linear router or plain LoRA, not a MixLoRA block"
                )
            blocks.setdefault(int(layer), {})[proj] = weights
        if set(blocks) != set(parsed.block_gates):
            raise FormatError(
                f"{ckpt.weights_path}: layers with experts {sorted(blocks)} and layers with "
                f"mlp.moe_gate.weight {sorted(parsed.block_gates)} differ"
            )
        for layer in sorted(blocks):
            name = f"model.layers.{layer}.mlp"
            experts = {
                proj: expert_stack(f"{name}.{proj}", w, expert_rank, expert_scaling, str(ckpt.path))
                for proj, w in blocks[layer].items()
            }
            gate = parsed.block_gates[layer].float()  # [E, D]; MixLoRA routes in fp32
            check_num_experts(cfg, gate.shape[0], f"{name}.moe_gate", where)
            router = Router("linear", gate.shape[0], weight=gate, compute_dtype="float32", **router_fields)
            units.append(FFNMoE(name, MLP_ARCHS[next(iter(experts))], act_fn, router, experts))
        notices = dora_notice(cfg)
        if cfg.get("expert_lora"):
            notices.append("expert_lora honoured as MoE-PEFT does (the mixlora 0.2.3 loader ignores it)")
        if cfg.get("jitter_noise"):
            notices.append("jitter_noise is training-only in MoE-PEFT; inference routes without noise")
        adapter = Adapter(cls.name, sorted(units, key=_unit_order), source_config=cfg, notices=notices)
        return adapter


def _unit_order(unit: Unit) -> tuple[int, str]:
    return (int(unit.name.split(".")[2]), unit.name)


def _base_hidden_act(base: BaseWeights | None, where: str) -> str:
    """MixLoRA's default activation is the base model's `hidden_act` (MoE-PEFT init_adapter)."""
    import json

    config_path = base.directory / "config.json" if base is not None else None
    if config_path is None or not config_path.is_file():
        raise FormatError(
            f"{where}: no act_fn saved and no base model config.json to read hidden_act from; pass --base"
        )
    act = json.loads(config_path.read_text()).get("hidden_act")
    if not isinstance(act, str):
        raise FormatError(f"{where}: no act_fn saved and {config_path} has no hidden_act")
    return act
