"""MoLA (GCYZSL/MoLA): per-linear top-k MoE-LoRA with a different expert count per decoder layer.

docs/formats.md ("mola"). MoLA saves neither the expert counts nor top-k: expert counts are
recovered from the tensors, top-k comes from the user (`--top-k`, one value or one per layer) or
defaults to 2 (MoLA's README setting), with a notice. The router matmul runs in the model dtype
(MoLA casts the model to fp16), its softmax in fp32, and the selected weights are renormalised.
Legend: E_l experts of layer l, R_l rank of layer l.
Layout source: GCYZSL/MoLA (peft 0.4 fork, adapter_model.bin).
"""

from __future__ import annotations

from moe_export.errors import FormatError
from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.common import (
    expert_linear,
    expert_pairs,
    layer_index,
    require_float,
    softmax_topk_router,
    split_module_keys,
)
from moe_export.formats.registry import Family, Signature, register
from moe_export.ir import Adapter

# Key tail after the module path -> part name (MoLA's saver strips `.default` from `lora_A.default_3`).
PARTS: dict[str, str | None] = {
    r"lora_A_(?P<e>\d+)\.weight": "A",
    r"lora_B_(?P<e>\d+)\.weight": "B",
    r"router\.router\.weight": "router",
}
DEFAULT_TOP_K = 2


def layer_value(value: int | list[int], layer: int, what: str, where: str) -> int:
    """One per-layer setting: an int for every layer, or the list entry of this layer."""
    if isinstance(value, list):
        if layer >= len(value):
            raise FormatError(f"{where}: {what} lists {len(value)} values, but the checkpoint has layer {layer}")
        return int(value[layer])
    return int(value)


@register
class Mola(Family):
    name = "mola"
    title = "MoLA"
    signature = Signature(("LORA",), keys=(r"\.router\.router\.weight$", r"\.lora_A_\d+\.weight$"))
    default_top_k = DEFAULT_TOP_K
    top_k_saved = False

    @classmethod
    def load(cls, ckpt: Checkpoint, base: BaseWeights | None) -> Adapter:
        config = ckpt.require_config("r", "lora_alpha")
        where = str(ckpt.config_path)
        ranks, alpha = config["r"], require_float(config, "lora_alpha", where)
        if not isinstance(ranks, (int, list)):
            raise FormatError(f"{where}: 'r' is {ranks!r}, expected an integer or a per-layer list")
        units = []
        for module, parts in split_module_keys(ckpt.tensors, PARTS, str(ckpt.weights_path), cls.title).items():
            layer = layer_index(module)
            a_list, b_list = expert_pairs(parts, module)
            if "router" not in parts:
                raise FormatError(f"{ckpt.weights_path}: {module} has experts but no router.router.weight")
            rank = layer_value(ranks, layer, "r", where)
            if a_list[0].shape[0] != rank:
                raise FormatError(
                    f"{ckpt.weights_path}: {module} experts have rank {a_list[0].shape[0]}, adapter_config.json "
                    f"says r={rank} for layer {layer}"
                )
            num_experts = len(b_list)
            # The default never asks for more experts than a layer has; --top-k is applied by the loading layer.
            k = min(cls.default_top_k or DEFAULT_TOP_K, num_experts)
            router = softmax_topk_router(parts["router"], k, compute_dtype="model")  # MoLA routes in the model dtype
            units.append(expert_linear(module, a_list, b_list, alpha / rank, router))
        adapter = Adapter(
            family=cls.name, units=units, source_config={"adapter_config": config, "top_k": cls.default_top_k}
        )  # the loader's default; --top-k, applied after loading, changes the routers, not this record
        return adapter
