"""Route replay: the candidate's routing decisions as the reference's forced routes, and the per-unit judgement of
a candidate run's taps against the replayed reference run's taps (validation/units.py says what is judged).
Legend: T tokens, E experts, K slots, D_in router input size.
"""

from __future__ import annotations

import numpy as np

from moe_export.reference.model import ReferenceUnit
from moe_export.reference.routing import ForcedRoute, router_dtype, router_probabilities, select_experts
from moe_export.runtimes.taps import UnitCapture, match_unit, node_index
from moe_export.validation.margins import UNIT_ROUNDOFF
from moe_export.validation.parity import Tolerance
from moe_export.validation.units import (
    TokenLayout,
    UnitComparison,
    decision_of,
    judge_flips,
    kept_slots,
    selection_mask,
)

Taps = dict[str, UnitCapture]  # node (or unit) name -> capture, in execution order


def reference_route(unit: ReferenceUnit, x: np.ndarray) -> UnitCapture:
    """The reference router's own decision on `x` [T, D_in]: ids, gates and fp32 probabilities."""
    import torch

    assert unit.router is not None and unit.router_weight is not None
    with torch.no_grad():
        probs = router_probabilities(
            unit.router, torch.from_numpy(x.astype(np.float32)), unit.router_weight, unit.router_bias
        )
        ids, gates = select_experts(unit.router, probs)  # [T, K]
    return UnitCapture(x, ids.numpy(), gates.numpy(), probs.numpy())


def router_roundoff(unit: ReferenceUnit, export_dtype: str) -> float:
    """Unit roundoff of the candidate's router matmul: the export dtype, or the router's own (fp32 routers)."""
    import torch

    assert unit.router is not None
    if unit.router.compute_dtype == "model":
        return UNIT_ROUNDOFF.get(export_dtype, UNIT_ROUNDOFF["fp32"])
    return float(torch.finfo(router_dtype(unit.router, torch.float32)).eps) / 2


def routing_taps(taps: Taps, units: dict[str, ReferenceUnit]) -> dict[str, UnitCapture]:
    """unit -> the candidate node that carries the unit's routing (its router input x and expert ids [T, K])."""
    chosen: dict[str, UnitCapture] = {}
    names = set(units)
    for node, capture in taps.items():
        unit_name = match_unit(node, names)
        unit = units.get(unit_name or "")
        if unit_name is None or unit is None or unit.router is None or unit_name in chosen or capture.x is None:
            continue
        assert unit.router_weight is not None
        ids, x = capture.expert_ids, capture.x
        if ids.shape[1] == unit.router.slots and x.shape == (ids.shape[0], unit.router_weight.shape[1]):
            chosen[unit_name] = capture  # the first such node; a slots unit's down_proj node sees [T*K] rows
    return chosen


def forced_routes(taps: Taps, units: dict[str, ReferenceUnit]) -> dict[str, ForcedRoute]:
    """The candidate's decisions, per token-routed unit, as the reference's forced routes."""
    import torch

    routes = {}
    for name, capture in routing_taps(taps, units).items():
        own = reference_route(units[name], capture.x) if capture.gates is None else None  # type: ignore[arg-type]
        kept = kept_slots(capture, None if own is None else own.gates, units[name].router.select)  # type: ignore[union-attr]
        routes[name] = ForcedRoute(torch.from_numpy(capture.expert_ids.astype(np.int64)), torch.from_numpy(kept))
    return routes


def compare_taps(
    per_unit: dict[str, UnitComparison],
    candidate: Taps,
    reference: Taps,
    units: dict[str, ReferenceUnit],
    export_dtype: str,
    tol: Tolerance,
    layout: TokenLayout,
) -> None:
    """One input's candidate taps against the replayed reference's: flips, same-input router, op checks."""
    names = set(units)
    for node, capture in candidate.items():
        unit_name = match_unit(node, names)
        if unit_name is None:
            continue
        judged = per_unit.setdefault(unit_name, UnitComparison(unit_name))
        experts = units[unit_name].experts
        index = node_index(node)
        if index < len(experts):
            judged.add_op_check(capture, *experts[index], tol, node)
        constant = units[unit_name].constant_route
        if constant is not None and capture.gates is not None:  # task routing: the gates are the task's weights
            judged.add_gate_error(
                _gate_error(
                    constant[0].expand(len(capture.expert_ids), -1).numpy(),
                    constant[1].expand(len(capture.expert_ids), -1).numpy(),
                    capture,
                )
            )
    for unit_name, capture in routing_taps(candidate, units).items():
        _judge_routing(per_unit[unit_name], capture, reference.get(unit_name), units[unit_name], export_dtype, layout)


def _judge_routing(
    judged: UnitComparison,
    capture: UnitCapture,
    replayed: UnitCapture | None,
    unit: ReferenceUnit,
    export_dtype: str,
    layout: TokenLayout,
) -> None:
    assert unit.router is not None and unit.router_weight is not None and capture.x is not None
    decision, roundoff = decision_of(unit.router), router_roundoff(unit, export_dtype)
    weight = unit.router_weight.detach().float().cpu().numpy()  # [E, D_in]
    num_experts = weight.shape[0]
    same = reference_route(unit, capture.x)
    kept = kept_slots(capture, same.gates if capture.gates is None else None, decision.select)
    chosen = selection_mask(capture.expert_ids, kept, num_experts)  # [T, E]
    # The same-input check compares every token (padding does not matter: both sides see the same x).
    flips, tokens = judge_flips(
        judged.name, decision, chosen, same, weight, capture.x, None, roundoff, TokenLayout(layout.label, layout.seq)
    )
    judged.add_flips(flips, tokens, same_input=True)
    if capture.gates is not None:
        own_gates = None if decision.select == "topk" else same.gates
        agree = (selection_mask(same.expert_ids, own_gates, num_experts) == chosen).all(-1)
        if decision.select == "dense":
            agree[:] = True  # a gate straddling SELECTED_GATE_MIN is no choice: compare every token's gates
        judged.add_gate_error(_gate_error(same.expert_ids, same.gates, capture, agree))
    if replayed is not None and replayed.probs is not None and replayed.x is not None:
        flips, tokens = judge_flips(
            judged.name, decision, chosen, replayed, weight, capture.x, replayed.x, roundoff, layout
        )
        judged.add_flips(flips, tokens, same_input=False)


def _gate_error(
    ids: np.ndarray, gates: np.ndarray, capture: UnitCapture, tokens: np.ndarray | None = None
) -> float | None:
    """max |reference gates - candidate gates| as dense [T, E] rows (over `tokens` [T] bool), None when none."""
    import torch

    from moe_export.ops.grouped_lora import dense_gates

    assert capture.gates is not None
    num_experts = 1 + int(max(ids.max(initial=0), capture.expert_ids.max(initial=0)))
    want = dense_gates(
        torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(gates.astype(np.float64)), num_experts, torch.float64
    )
    got = dense_gates(
        torch.from_numpy(capture.expert_ids.astype(np.int64)),
        torch.from_numpy(capture.gates.astype(np.float64)),
        num_experts,
        torch.float64,
    )
    diff = (want - got).abs()
    if tokens is not None:
        diff = diff[torch.from_numpy(tokens)]
    return float(diff.max()) if diff.numel() else None


def first_diverging_unit(candidate: Taps, reference: Taps, units: dict[str, ReferenceUnit], tol: Tolerance) -> str:
    """A phrase naming the first unit (reference execution order) whose input differs beyond `tol` under replay, and
    the units run just before it: the error lies after the last input that agreed, in one of those."""
    by_unit = {match_unit(node, set(units)) or node: c for node, c in reversed(list(candidate.items()))}
    before: list[str] = []
    for name, want in reference.items():
        got = by_unit.get(name)
        if got is None or got.x is None or want.x is None or got.x.shape != want.x.shape:
            continue
        diff = np.abs(got.x.astype(np.float64) - want.x.astype(np.float64))
        if diff.size and float(diff.max()) > tol.bound(float(np.abs(want.x).max())):
            after = f"after units {', '.join(before[-3:])}" if before else "before the first routed unit"
            return f"first diverging unit {name} (its input differs by {float(diff.max()):.3g} under route replay; {after})"
        before.append(name)
    return "every routed unit's input agrees under route replay: the divergence is after the last routed unit"
