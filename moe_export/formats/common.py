"""Pieces several loaders share: key parsing, expert stacking, the dense per-linear layout, top-k overrides."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from moe_export.errors import FormatError
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.registry import Signature
from moe_export.ir import Adapter, ExpertStack, LinearMoE, Router, SharedLoRA, rank_scaling

PEFT_PREFIX = "base_model.model."
LAYER_RX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def module_path(key: str, prefix: str = PEFT_PREFIX) -> str:
    """HF module path relative to the CausalLM: strip PEFT's `base_model.model.` wrapper."""
    return key[len(prefix) :] if key.startswith(prefix) else key


def layer_index(module: str) -> int:
    """Decoder layer index of a module path (`model.layers.3.mlp.up_proj` -> 3)."""
    m = LAYER_RX.search(module)
    if m is None:
        raise FormatError(f"{module}: cannot find the decoder layer index (expected '.layers.N.')")
    return int(m.group(1))


def stack_experts(
    module: str, a_list: list[torch.Tensor], b_list: list[torch.Tensor], scaling: list[float] | float
) -> ExpertStack:
    """Stack per-expert A [R, D_in] and B [D_out, R] matrices, checking they agree."""
    if not b_list:
        raise FormatError(f"{module}: no experts found")
    shapes_a = {tuple(a.shape) for a in a_list}
    shapes_b = {tuple(b.shape) for b in b_list}
    if len(shapes_a) != 1 or len(shapes_b) != 1:
        raise FormatError(f"{module}: experts have different shapes (A {sorted(shapes_a)}, B {sorted(shapes_b)})")
    scalings = [float(scaling)] * len(b_list) if isinstance(scaling, (int, float)) else [float(s) for s in scaling]
    return ExpertStack(torch.stack(a_list), torch.stack(b_list), torch.tensor(scalings, dtype=torch.float32))


def indexed(parts: dict[str, torch.Tensor], prefix: str, module: str) -> list[torch.Tensor]:
    """Collect `{prefix}{e}` parts in expert order 0..E-1, failing on gaps."""
    found = {int(k[len(prefix) :]): v for k, v in parts.items() if k.startswith(prefix) and k[len(prefix) :].isdigit()}
    if sorted(found) != list(range(len(found))):
        raise FormatError(f"{module}: expert indices {sorted(found)} for '{prefix}N' are not 0..E-1")
    return [found[e] for e in range(len(found))]


def override_top_k(adapter: Adapter, top_k: int | list[int]) -> None:
    """Set top-k on every top-k-routed unit; a list gives one value per decoder layer."""
    for unit in adapter.units:
        router = unit.router
        if router is None or router.select != "topk":
            continue
        if isinstance(top_k, list):
            layer = layer_index(unit.name)
            if layer >= len(top_k):
                raise FormatError(f"--top-k lists {len(top_k)} values, unit {unit.name} is in layer {layer}")
            k = top_k[layer]
        else:
            k = top_k
        if not 1 <= k <= router.num_experts:
            layer = layer_index(unit.name)
            raise FormatError(
                f"--top-k {k} for layer {layer} ({unit.name}): that layer has {router.num_experts} experts"
            )
        unit.router = replace(router, top_k=k)


def split_module_keys(
    tensors: dict[str, torch.Tensor], parts: dict[str, str | None], where: str, family: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Group a PEFT-style state dict by adapted module, renaming each key's tail through `parts`.

    `parts` maps a regex for the key's tail (after `<module>.`) to a part name; a named group `e` (expert
    index) is appended to the name (`A` + `3` -> `A3`). A part name of None marks a known duplicate that is
    dropped. A key matching no entry is an error: silently ignoring weights would change the model.
    Returns {module path (PEFT prefix stripped): {part: tensor}} in model order (`sorted_modules`).
    """
    compiled = [(re.compile(rf"(?P<module>.+?)\.{tail}"), name) for tail, name in parts.items()]
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unexpected: list[str] = []
    for key, tensor in tensors.items():
        for rx, name in compiled:
            m = rx.fullmatch(key)
            if m is None:
                continue
            if name is not None:
                grouped[module_path(m.group("module"))][name + (m.groupdict().get("e") or "")] = tensor
            break
        else:
            unexpected.append(key)
    if unexpected:
        raise FormatError(
            f"{where}: {len(unexpected)} unexpected tensor(s) for a {family} checkpoint, e.g. {sorted(unexpected)[:3]}; "
            "the checkpoint holds weights this loader does not understand (pass --family to pick another family)"
        )
    if not grouped:
        raise FormatError(f"{where}: no adapted modules found for a {family} checkpoint")
    return {module: grouped[module] for module in sorted_modules(grouped)}


def expert_pairs(parts: dict[str, torch.Tensor], module: str, a: str = "A", b: str = "B") -> tuple[list, list]:
    """The per-expert A and B lists of one module, in expert order, checking both have the same count."""
    a_list, b_list = indexed(parts, a, module), indexed(parts, b, module)
    if len(a_list) != len(b_list):
        raise FormatError(f"{module}: {len(a_list)} expert A matrices but {len(b_list)} expert B matrices")
    for e, (a_e, b_e) in enumerate(zip(a_list, b_list, strict=True)):
        if a_e.ndim != 2 or b_e.ndim != 2 or a_e.shape[0] != b_e.shape[1]:
            raise FormatError(f"{module}: expert {e} A{tuple(a_e.shape)} and B{tuple(b_e.shape)} do not chain")
    return a_list, b_list


def require_int(config: dict, key: str, where: str, minimum: int = 1) -> int:
    """An integer config value (JSON may hold 8 or 8.0), with a clear error otherwise."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise FormatError(f"{where}: '{key}' is {value!r}, expected an integer >= {minimum}")
    return int(value)


def require_float(config: dict, key: str, where: str, default: float | None = None) -> float:
    """A finite number from the config (`default` when the key is absent), with a clear error otherwise."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(f"{where}: '{key}' is {value!r}, expected a number")
    return float(value)


def require_bool(config: dict, key: str, where: str, default: bool = False) -> bool:
    """A JSON true/false from the config (`default` when absent or null): the string "false" is truthy in
    Python, so it would silently switch the option on (rsLoRA's scaling alpha/sqrt(r) instead of alpha/r)."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FormatError(f"{where}: '{key}' is {value!r}, expected true or false")
    return value


def sorted_modules(modules: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Module paths in model order (layer index, then name) so units and tables read top to bottom."""

    def order(name: str) -> tuple[int, str]:
        m = LAYER_RX.search(name)
        return (int(m.group(1)) if m else -1, name)

    return sorted(modules, key=order)


# PEFT's indexed expert layout (GOAT, MoELoRA): `<module>.lora_A.{e}.weight` [R, D_in], `.lora_B.{e}.weight` [D_out, R].
PEFT_EXPERT_PARTS: dict[str, str | None] = {r"lora_A\.(?P<e>\d+)\.weight": "A", r"lora_B\.(?P<e>\d+)\.weight": "B"}


def peft_expert_modules(
    ckpt: Checkpoint, family: str, router_key: str, num_experts: int, rank: int, ignored: tuple[str, ...] = ()
) -> Iterator[tuple[str, list[torch.Tensor], list[torch.Tensor], torch.Tensor]]:
    """(module, A list, B list, router weight [E, D_in]) of each linear in PEFT's indexed expert layout.

    Each module holds `PEFT_EXPERT_PARTS` and one `<module>.<router_key>.weight`, and must agree with the
    config's expert count and per-expert rank. `ignored`: key-tail regexes of known duplicates, dropped.
    """
    parts = {**PEFT_EXPERT_PARTS, rf"{re.escape(router_key)}\.weight": "router", **dict.fromkeys(ignored)}
    where = str(ckpt.weights_path)
    for module, found in split_module_keys(ckpt.tensors, parts, where, family).items():
        a_list, b_list = expert_pairs(found, module)
        if len(b_list) != num_experts or "router" not in found:
            raise FormatError(
                f"{where}: {module} holds {len(b_list)} experts and {'a' if 'router' in found else 'no'} {router_key}; "
                f"adapter_config.json says {num_experts} experts"
            )
        if a_list[0].shape[0] != rank:
            raise FormatError(
                f"{where}: {module} experts have rank {a_list[0].shape[0]}, adapter_config.json gives {rank}"
            )
        yield module, a_list, b_list, found["router"]


def expert_linear(
    module: str,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    scaling: list[float] | float,
    router: Router,
    shared: list[SharedLoRA] | None = None,
) -> LinearMoE:
    """One routed linear from its per-expert A [R, D_in] / B [D_out, R] lists; its sizes are the experts'."""
    stack = stack_experts(module, a_list, b_list, scaling)
    return LinearMoE(module, stack.A.shape[2], stack.B.shape[1], stack, router, shared or [])


def softmax_topk_router(weight: torch.Tensor, top_k: int, compute_dtype: str = "float32") -> Router:
    """The per-linear router of GOAT, MoLA and MoELoRA: softmax, top-k, renormalised over the k."""
    return Router(
        kind="linear",
        num_experts=weight.shape[0],
        select="topk",
        top_k=top_k,
        renormalize=True,
        compute_dtype=compute_dtype,
        weight=weight,
    )


def old_peft_signature(keys: tuple[str, ...], forbidden: tuple[str, ...] = ()) -> Signature:
    """LoRAMoE's and HydraLoRA's layout: their vendored old peft writes peft_type LORA, or none at all."""
    return Signature(("LORA",), keys, forbidden, peft_type_required=False)


StackBuilder = Callable[[str, dict[str, torch.Tensor], float], ExpertStack]


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
    units = []
    for module, found in split_module_keys(ckpt.tensors, parts, str(ckpt.weights_path), family).items():
        if "route" not in found:
            raise FormatError(f"{ckpt.weights_path}: {module} has LoRA experts but no lora_route.weight")
        stack = build_stack(module, found, scaling)
        if stack.rank != rank:
            raise FormatError(f"{ckpt.weights_path}: {module} has rank {stack.rank}, {where} says r={rank}")
        if declared is not None and declared != stack.num_experts:
            raise FormatError(f"{where}: lora_nums={declared}, but {module} holds {stack.num_experts} experts")
        # Routed in the model dtype: softmax(G x, dtype=float32).to(y.dtype) (docs/formats.md, "loramoe", "hydralora").
        router = Router(
            "linear", stack.num_experts, "dense", renormalize=False, compute_dtype="model", weight=found["route"]
        )
        units.append(LinearMoE(module, stack.A.shape[2], stack.B.shape[1], stack, router))
    return units
