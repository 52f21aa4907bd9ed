"""Packed base projections for the contrib decoder: one MatMul for a layer's q, k and v, as onnxruntime-genai's
builder writes it for Llama. (gate/up packed the same way measured within noise of two MatMuls on the bench model,
-1.6% to +0.7% per call, README: Measured, so the MLP keeps its own; a pack is one PACKS entry.)

Each packed projection is an nn.Linear attached to the layer for the trace (`self_attn.qkv_proj`), whose weight
rows are its members' base weights in order, taken after every fold and merge; int4 quantization then rewrites
one MatMulNBits per pack (export/quantize.py sees an nn.Linear's module scope).
The members keep their modules: a routed member (reference.MoELoRALinear) still runs its router and GroupedLoRA
node under its own name and adds its delta to its slice of the packed output, so node and unit names, function
bodies and router chains are those of the unpacked graph. The plan is export.json's `fusion.packed`
({packed module: [[member base linear, rows], ...]}), which validation reads to split a quantized pack's
dequantized weight back into its members (`unpack_weights`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

# (owner module under a decoder layer, member projections in packed order, the packed module's name, what else the
# decoder's explicit forward calls on the owner: export/decoder_fused.py)
ATTENTION_PACK = ("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj", ())
PACKS = (ATTENTION_PACK,)
PackPlan = dict[str, list[list[Any]]]  # packed module path -> [[member base linear path, rows], ...]


def base_linear(module: Any) -> tuple[str, Any] | None:
    """(path suffix, nn.Linear) of a projection's base weight: itself when plain, `.base` inside a MoELoRALinear
    (which takes its base output from outside); None for anything else (a unit wrapping a whole block)."""
    import torch

    from moe_export.reference.model import MoELoRALinear

    if isinstance(module, torch.nn.Linear):
        return "", module
    if isinstance(module, MoELoRALinear) and isinstance(module.base, torch.nn.Linear):
        return ".base", module.base
    return None


def packing_plan(model: Any) -> PackPlan:
    """Which projections of each decoder layer pack together: all members present, with base linears that share
    the input size, dtype and bias presence."""
    plan: PackPlan = {}
    for i, layer in enumerate(model.model.layers):
        for owner_name, members, packed, needed in PACKS:
            owner = getattr(layer, owner_name, None)
            found = [base_linear(getattr(owner, m, None)) for m in members]
            plain = owner is not None and getattr(owner, "unit_name", None) is None  # a unit wrapping the block: no
            if not plain or any(f is None for f in found) or not all(hasattr(owner, n) for n in needed):
                continue
            linears = [f[1] for f in found]  # type: ignore[index]
            first = linears[0]
            if any((li.in_features, li.weight.dtype, li.bias is None) != (first.in_features, first.weight.dtype,
                                                                             first.bias is None) for li in linears):  # fmt: skip
                continue
            prefix = f"model.layers.{i}.{owner_name}"
            plan[f"{prefix}.{packed}"] = [
                [f"{prefix}.{m}{f[0]}", int(li.out_features)]  # type: ignore[index]
                for m, f, li in zip(members, found, linears, strict=True)
            ]
    return plan


@contextmanager
def packed_projections(model: Any, plan: PackPlan) -> Iterator[None]:
    """Inside the block each pack of `plan` is an nn.Linear attached to its layer (concatenated weights); removed
    after. The concatenation is a copy of the members' weights for the trace: +99 MB (2.9%) export peak RSS on the
    bench model (README, Measured); making the members views of the pack measured the same peak, so they stay
    untouched."""
    import torch

    attached = []
    try:
        for packed, members in plan.items():
            owner_path, _, name = packed.rpartition(".")
            owner = model.get_submodule(owner_path)
            linears = [model.get_submodule(path) for path, _ in members]
            with torch.no_grad():
                weight = torch.cat([li.weight for li in linears])  # [sum(rows), D_in]
                bias = None if linears[0].bias is None else torch.cat([li.bias for li in linears])
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                linear.bias = torch.nn.Parameter(bias, requires_grad=False)
            owner.add_module(name, linear)
            attached.append((owner, name))
        yield
    finally:
        for owner, name in attached:
            delattr(owner, name)


def packed_forward(owner: Any, pack_spec: tuple[Any, ...], x: Any) -> list[Any]:
    """Each member projection's output on `x` (`pack_spec`: one of PACKS): from one packed MatMul when `owner`
    carries the pack (each member's slice, plus a routed member's own delta), else each member called as it is."""
    from moe_export.reference.model import MoELoRALinear

    _, members, packed, _ = pack_spec
    pack = getattr(owner, packed, None)
    modules = [getattr(owner, m) for m in members]
    if pack is None:
        return [module(x) for module in modules]
    slices = pack(x).split([m.out_features for m in modules], dim=-1)
    return [m(x, base_output=s) if isinstance(m, MoELoRALinear) else s for m, s in zip(modules, slices, strict=True)]


def unpack_weights(weights: dict[str, np.ndarray], plan: PackPlan | None) -> dict[str, np.ndarray]:
    """module -> [N, K] weights with each pack's rows split back into its members (nn.Linear layout)."""
    out = dict(weights)
    for packed, members in (plan or {}).items():
        if packed not in out:
            continue
        stacked = out.pop(packed)
        bounds = np.cumsum([0] + [rows for _, rows in members])
        out.update({path: stacked[a:b] for (path, _), a, b in zip(members, bounds[:-1], bounds[1:], strict=True)})
    return out
