"""The faithful PyTorch forward of an `FFNMoE` unit (MixLoRA): one router per MLP block.

Every expert is the whole gated FFN with LoRA deltas on its adapted projections
(docs/formats.md, "mixlora"; MoE-PEFT `MixtralSparseMoe.forward` + `LlamaMLP._mixlora_forward`):

    out = sum_{e in sel(h)} w_e * down_e(act(gate_e(h)) * up_e(h)),   proj_e(z) = W z + b + s_e B_e A_e z

with `h` the MLP input (the post-attention-normed hidden state) and no separate base-FFN term.
The selected experts are K slots per token; each slot's LoRA deltas come from the opaque op
`moe_export::grouped_lora_slots`, so torch.export sees no data-dependent loop over experts.
Legend: T tokens, K slots, E experts, R rank, D hidden size, I intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moe_export.errors import FormatError
from moe_export.ir import Adapter, FFNMoE, Unit
from moe_export.ops.grouped_lora_slots import grouped_lora_slots
from moe_export.reference.routing import ForcedRoute, route_tokens

# Projections of each supported MLP layout, in the order the block applies them.
ARCH_PROJECTIONS: dict[str, tuple[str, ...]] = {"llama_gated": ("gate_proj", "up_proj", "down_proj")}


class MoEFFN(nn.Module):
    """A gated MLP whose experts are LoRA-adapted copies of it, mixed by one block-level router."""

    def __init__(self, base: nn.Module, unit: FFNMoE, act: nn.Module) -> None:
        super().__init__()
        self.unit_name = unit.name
        self.router = unit.router
        self.gate_proj, self.up_proj, self.down_proj = base.gate_proj, base.up_proj, base.down_proj
        self.act = act
        self.record_routing: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
        self.forced_route: ForcedRoute | None = None  # as MoELoRALinear.forced_route
        dtype = self.gate_proj.weight.dtype
        self.adapted = sorted(unit.experts)
        # The order forward() runs the adapted projections in: the export names their op nodes unit, unit#2, ...
        self.execution_order = [p for p in ARCH_PROJECTIONS[unit.arch] if p in unit.experts]
        for proj, stack in unit.experts.items():
            self.register_buffer(f"{proj}_A", stack.A.to(dtype), persistent=False)  # [E_A, R, D_in]
            self.register_buffer(f"{proj}_B", stack.scaled_b(dtype), persistent=False)  # [E, D_out, R]
        # Router tensors keep their own dtype (MixLoRA routes in fp32); cast_reference_model keeps them.
        self.register_buffer("router_weight", unit.router.weight, persistent=False)  # [E, D]
        self.register_buffer("router_bias", unit.router.bias, persistent=False)  # [E] or None

    def _project(self, proj: str, x: torch.Tensor, base_out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per-slot output [T, K, D_out] of one projection; x [T, D_in] or [T, K, D_in] per slot."""
        if proj not in self.adapted:
            return base_out if base_out.dim() == 3 else base_out[:, None, :].expand(-1, ids.shape[1], -1)
        a, b = getattr(self, f"{proj}_A"), getattr(self, f"{proj}_B")
        if x.dim() == 2:
            delta = grouped_lora_slots(x, ids, a, b)  # [T, K, D_out]
            return base_out[:, None, :] + delta.to(base_out.dtype)
        num_tokens, num_slots, d_in = x.shape
        # Each slot has its own input (the down projection's): T*K rows with one slot each.
        delta = grouped_lora_slots(x.reshape(-1, d_in), ids.reshape(-1, 1), a, b)  # [T*K, 1, D_out]
        return base_out + delta.view(num_tokens, num_slots, -1).to(base_out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [T, D]
        ids, gates = route_tokens(self.router, flat, self.router_weight, self.router_bias)  # [T, K] each
        if self.record_routing is not None:
            self.record_routing(self.unit_name, flat, ids, gates)
        if self.forced_route is not None:
            ids, gates = route_tokens(self.router, flat, self.router_weight, self.router_bias, self.forced_route)
        gate = self._project("gate_proj", flat, self.gate_proj(flat), ids)  # [T, K, I]
        up = self._project("up_proj", flat, self.up_proj(flat), ids)  # [T, K, I]
        hidden = self.act(gate) * up  # [T, K, I]
        out = self._project("down_proj", hidden, self.down_proj(hidden), ids)  # [T, K, D]
        # MixLoRA accumulates the weighted slots in fp32 (the router dtype) and casts back.
        mixed = (gates.float()[:, :, None] * out.float()).sum(dim=1)  # [T, D]
        return mixed.to(x.dtype).view(x.shape)


def _activation(unit: FFNMoE) -> nn.Module:
    from transformers.activations import ACT2FN

    try:
        return ACT2FN[unit.act_fn]
    except KeyError as exc:
        raise FormatError(f"unit {unit.name}: activation {unit.act_fn!r} is not a transformers ACT2FN name") from exc


def build_ffn_moe(base: nn.Module, unit: Unit, adapter: Adapter, task_id: int | None) -> nn.Module:
    """`reference.UNIT_MODULE_BUILDERS["ffn_moe"]`: check the base MLP fits the unit, then wrap it."""
    assert isinstance(unit, FFNMoE)
    projections = ARCH_PROJECTIONS.get(unit.arch)
    if projections is None:
        raise FormatError(
            f"unit {unit.name}: MLP layout {unit.arch!r} is not supported (known: {sorted(ARCH_PROJECTIONS)})"
        )
    unknown = sorted(set(unit.experts) - set(projections))
    if unknown:
        raise FormatError(f"unit {unit.name}: projections {unknown} are not part of a {unit.arch} MLP {projections}")
    for proj in projections:
        linear = getattr(base, proj, None)
        if not isinstance(linear, nn.Linear):
            raise FormatError(
                f"unit {unit.name}: the base model's MLP ({type(base).__name__}) has no Linear {proj}; "
                "is --base the model the adapter was trained on?"
            )
        stack = unit.experts.get(proj)
        if stack is not None and (stack.A.shape[2], stack.B.shape[1]) != (linear.in_features, linear.out_features):
            raise FormatError(
                f"unit {unit.name}.{proj}: experts fit Linear({stack.A.shape[2]} -> {stack.B.shape[1]}), the base model "
                f"has Linear({linear.in_features} -> {linear.out_features}); is --base the right model?"
            )
    hidden = base.gate_proj.in_features
    weight = unit.router.weight
    if weight is None or weight.shape[1] != hidden:
        shape = None if weight is None else tuple(weight.shape)
        raise FormatError(f"unit {unit.name}: router weight {shape} does not take the MLP input of size {hidden}")
    return MoEFFN(base, unit, _activation(unit))
