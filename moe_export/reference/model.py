"""The faithful PyTorch forward: adapted modules of a transformers model replaced by MoE-LoRA modules.

This is the parity oracle. It follows the original code's formulas (docs/formats.md): router
matmul in the family's dtype, fp32 softmax, top-k / dense / top-p selection, renormalisation, scaling,
always-on shared LoRAs. The routed experts run through the opaque custom op `moe_export::grouped_lora`.
Legend: T tokens, E experts, K slots, R rank, D_in / D_out feature sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from moe_export.errors import FormatError
from moe_export.ir import Adapter, LinearMoE, Router, Unit
from moe_export.ir.fold import SharedOnly, fold_into_weight
from moe_export.ops.grouped_lora import grouped_lora
from moe_export.reference.ffn import build_ffn_moe
from moe_export.reference.routing import ForcedRoute, route_constant, route_tokens


class MoELoRALinear(nn.Module):
    """An nn.Linear plus shared LoRAs and routed LoRA experts (one `LinearMoE` unit)."""

    def __init__(self, base: nn.Linear, unit: LinearMoE, task_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.base = base
        self.unit_name = unit.name
        self.in_features, self.out_features = unit.in_features, unit.out_features
        dtype = base.weight.dtype
        self.shared_scalings = [s.scaling for s in unit.shared]
        for j, s in enumerate(unit.shared):
            self.register_buffer(f"shared_A_{j}", s.A.to(dtype), persistent=False)
            self.register_buffer(f"shared_B_{j}", s.B.to(dtype), persistent=False)
        self.router: Router | None = unit.router if unit.experts is not None else None
        self.record_routing: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
        # Set by validation (reference.force_routing) to replay a candidate's decisions in the next forward.
        self.forced_route: ForcedRoute | None = None
        if unit.experts is None:
            return
        assert self.router is not None
        self.register_buffer("expert_A", unit.experts.A.to(dtype), persistent=False)  # [E_A, R, D_in]
        self.register_buffer("expert_B", unit.experts.scaled_b(dtype), persistent=False)  # [E, D_out, R]
        # Router tensors keep their own dtype (fp32 in most families); cast_reference_model preserves it.
        if self.router.kind == "task":
            if task_weights is None:
                raise FormatError(f"unit {unit.name} routes by task: a task id is needed (--task-id)")
            self.register_buffer("task_weights", task_weights.float(), persistent=False)  # [E]
        else:
            self.register_buffer("router_weight", unit.router.weight, persistent=False)  # [E, D_in]
            self.register_buffer("router_bias", unit.router.bias, persistent=False)  # [E] or None

    @property
    def routed(self) -> bool:
        return self.router is not None

    def shared_pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        for j, scaling in enumerate(self.shared_scalings):
            yield getattr(self, f"shared_A_{j}"), getattr(self, f"shared_B_{j}"), scaling

    def route(self, flat: torch.Tensor, forced: ForcedRoute | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert_ids [T, K], gates [T, K]) for flat tokens [T, D_in]; `forced` replays another run's decisions."""
        assert self.router is not None
        if self.router.kind == "task":  # input-independent: nothing to replay
            return route_constant(self.router, self.task_weights, flat.shape[0])
        return route_tokens(self.router, flat, self.router_weight, self.router_bias, forced)

    def forward(self, x: torch.Tensor, base_output: torch.Tensor | None = None) -> torch.Tensor:
        """base(x) + the shared and routed LoRA deltas; `base_output`: base(x) computed by the caller (the contrib
        decoder's packed q/k/v MatMul, export/packing.py)."""
        y = self.base(x) if base_output is None else base_output
        flat = x.reshape(-1, self.in_features)  # [T, D_in]
        delta = None
        for a, b, scaling in self.shared_pairs():
            term = (flat @ a.T) @ b.T * scaling  # [T, D_out]
            delta = term if delta is None else delta + term
        if self.router is not None:
            ids, gates = self.route(flat)
            if self.record_routing is not None:
                self.record_routing(self.unit_name, flat, ids, gates)
            if self.forced_route is not None:
                ids, gates = self.route(flat, self.forced_route)
            routed = grouped_lora(flat, ids, gates.to(flat.dtype), self.expert_A, self.expert_B)  # [T, D_out]
            delta = routed if delta is None else delta + routed
        if delta is None:
            return y
        return y + delta.view(*x.shape[:-1], self.out_features).to(y.dtype)

    @torch.no_grad()
    def fold_shared_into_base(self, unit: LinearMoE) -> None:
        """W <- W + sum_shared s B A (exact), then drop the shared branch."""
        fold_into_weight(self.base.weight, unit, SharedOnly())
        for j in range(len(self.shared_scalings)):
            delattr(self, f"shared_A_{j}")
            delattr(self, f"shared_B_{j}")
        self.shared_scalings = []


UnitModuleBuilder = Callable[[nn.Module, Unit, Adapter, "int | None"], nn.Module]


def _build_linear_moe(base: nn.Module, unit: Unit, adapter: Adapter, task_id: int | None) -> nn.Module:
    assert isinstance(unit, LinearMoE)
    if not isinstance(base, nn.Linear):
        raise FormatError(f"unit {unit.name}: the base model's module is {type(base).__name__}, not nn.Linear")
    if (base.in_features, base.out_features) != (unit.in_features, unit.out_features):
        raise FormatError(
            f"unit {unit.name}: adapter expects Linear({unit.in_features} -> {unit.out_features}), base model has "
            f"Linear({base.in_features} -> {base.out_features}); is --base the model the adapter was trained on?"
        )
    task_weights = None
    if unit.router is not None and unit.router.kind == "task" and unit.experts is not None:
        from moe_export.errors import MoeExportError

        if task_id is None:
            raise MoeExportError(f"{adapter.family} routes by task id: pass --task-id N to pick a task")
        assert unit.router.task_gate is not None
        task_weights = adapter.task_gates[unit.router.task_gate].weights(task_id)
    return MoELoRALinear(base, unit, task_weights)


# One builder per unit kind; families with block-level units (MixLoRA) register theirs here.
UNIT_MODULE_BUILDERS: dict[str, UnitModuleBuilder] = {"linear_moe": _build_linear_moe, "ffn_moe": build_ffn_moe}


def apply_adapter(model: nn.Module, adapter: Adapter, task_id: int | None = None) -> nn.Module:
    """Replace every adapted module of `model` in place; check every unit first, then mutate."""
    plan: list[tuple[nn.Module, str, nn.Module]] = []
    for unit in adapter.units:
        try:
            base = model.get_submodule(unit.name)
        except AttributeError as exc:
            raise FormatError(
                f"unit {unit.name}: the base model has no such module; is the base model the one the adapter was "
                "trained on (--base)?"
            ) from exc
        builder = UNIT_MODULE_BUILDERS.get(unit.kind)
        if builder is None:
            raise FormatError(f"unit {unit.name}: unit kind {unit.kind!r} is not supported by this moe-export")
        parent_name, _, child = unit.name.rpartition(".")
        plan.append(
            (model.get_submodule(parent_name) if parent_name else model, child, builder(base, unit, adapter, task_id))
        )
    for parent, child, module in plan:
        setattr(parent, child, module)
    return model


@contextmanager
def force_routing(model: nn.Module, routes: dict[str, ForcedRoute]) -> Iterator[None]:
    """Inside the block, each named unit of `model` routes with the given decisions (its own gate formula)."""
    modules = [(m, routes[n]) for n, m in moe_modules(model) if n in routes and hasattr(m, "forced_route")]
    for module, route in modules:
        module.forced_route = route
    try:
        yield
    finally:
        for module, _ in modules:
            module.forced_route = None


@dataclass
class ReferenceUnit:
    """What a comparator needs from one reference unit: its router (token-routed units) and expert weights."""

    router: Router | None  # None: nothing input dependent (task routing, unrouted)
    router_weight: torch.Tensor | None  # [E, D_in]
    router_bias: torch.Tensor | None  # [E]
    experts: list[tuple[torch.Tensor, torch.Tensor]]  # (A, B scaled) of each routed op the unit runs, in order
    constant_route: tuple[torch.Tensor, torch.Tensor] | None = None  # task routing: (ids [1, K], gates [1, K])


def reference_units(model: nn.Module) -> dict[str, ReferenceUnit]:
    """unit name -> ReferenceUnit of every adapter module of `model` (per projection for FFN units)."""
    units = {}
    for name, m in moe_modules(model):
        router = getattr(m, "router", None)
        token_routed = router is not None and router.kind == "linear"
        experts = [(m.expert_A, m.expert_B)] if getattr(m, "expert_A", None) is not None else []
        experts += [(getattr(m, f"{p}_A"), getattr(m, f"{p}_B")) for p in getattr(m, "execution_order", [])]
        constant = None
        if router is not None and router.kind == "task":
            constant = route_constant(router, m.task_weights, 1)
        units[name] = ReferenceUnit(
            router if token_routed else None,
            m.router_weight if token_routed else None,
            getattr(m, "router_bias", None) if token_routed else None,
            experts,
            constant,
        )
    return units


def moe_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every adapter module in the model, with its unit name."""
    for module in model.modules():
        name = getattr(module, "unit_name", None)
        if name is not None:
            yield name, module


@torch.no_grad()
def cast_reference_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the model to `dtype` but keep router tensors in their own dtype (fp32 routers stay fp32)."""
    kept: list[tuple[nn.Module, str, torch.Tensor]] = []
    for _, module in moe_modules(model):
        for buffer in ("router_weight", "router_bias", "task_weights"):
            value = getattr(module, buffer, None)
            if value is not None:
                kept.append((module, buffer, value.clone()))
    model.to(dtype)
    for module, buffer, value in kept:
        setattr(module, buffer, value)
    return model
