"""Describe a canonical adapter as plain data (for `moe-export inspect` and reports)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from moe_export.ir.adapter import Adapter
from moe_export.ir.units import ExpertStack, FFNMoE, LinearMoE, Router, Unit


def describe_router(router: Router | None) -> dict[str, Any] | None:
    if router is None or router.kind == "none":
        return None
    return {
        "kind": router.kind,
        "select": router.select,
        "top_k": router.top_k,
        "top_p": router.top_p,
        "renormalize": router.renormalize,
        "compute_dtype": router.compute_dtype,
        "task_gate": router.task_gate,
        "has_bias": router.bias is not None,
    }


def _stack_params(stack: ExpertStack) -> int:
    return stack.A.numel() + stack.B.numel()


def _router_params(router: Router | None) -> int:
    if router is None:
        return 0
    return sum(t.numel() for t in (router.weight, router.bias) if t is not None)


def describe_unit(unit: Unit) -> dict[str, Any]:
    """One row: module, E, k, rank, router, shared LoRAs and parameter counts of a unit."""
    router = unit.router
    if isinstance(unit, LinearMoE):
        stack = unit.experts
        experts = {
            "num_experts": stack.num_experts if stack else 0,
            "rank": stack.rank if stack else None,
            "shared_a": bool(stack and stack.shared_a),
            "scaling": sorted({round(float(s), 6) for s in stack.scaling}) if stack else [],
        }
        shared = [{"rank": s.A.shape[0], "scaling": s.scaling, "origin": s.origin} for s in unit.shared]
        params = {
            "experts": _stack_params(stack) if stack else 0,
            "router": _router_params(router),
            "shared": sum(s.A.numel() + s.B.numel() for s in unit.shared),
        }
        shape = {"in_features": unit.in_features, "out_features": unit.out_features}
    else:
        assert isinstance(unit, FFNMoE)
        first = next(iter(unit.experts.values()), None)
        experts = {
            "num_experts": unit.router.num_experts,
            "rank": first.rank if first else None,
            "shared_a": False,
            "projections": sorted(unit.experts),
        }
        shared = []
        params = {
            "experts": sum(_stack_params(s) for s in unit.experts.values()),
            "router": _router_params(router),
            "shared": 0,
        }
        shape = {"arch": unit.arch, "act_fn": unit.act_fn}
    k = router.slots if router is not None and unit.routed and router.kind != "none" else None
    return {
        "module": unit.name,
        "kind": unit.kind,
        **shape,
        **experts,
        "k": k,
        "router": describe_router(router) if unit.routed else None,
        "shared": shared,
        "params": params,
    }


def describe_adapter(adapter: Adapter, family_title: str | None = None, task_id: int | None = None) -> dict[str, Any]:
    """Everything `inspect` shows: family, base model, per-unit rows, parameter totals, notices."""
    units = [describe_unit(u) for u in adapter.units]
    totals = Counter()
    for row in units:
        totals.update(row["params"])
    gates = {}
    for name, gate in adapter.task_gates.items():
        gates[name] = {
            "num_tasks": gate.embedding.shape[0],
            "embedding_dim": gate.embedding.shape[1],
            "num_experts": gate.gate.shape[0],
            "params": gate.embedding.numel() + gate.gate.numel(),
        }
        if task_id is not None:
            gates[name]["weights_for_task"] = [round(float(w), 6) for w in gate.weights(task_id)]
        totals["task_gates"] += gates[name]["params"]
    counts = Counter(row["num_experts"] for row in units)
    return {
        "family": adapter.family,
        "family_title": family_title or adapter.family,
        "base_model": adapter.base_model,
        "num_units": len(units),
        "num_routed_units": sum(1 for u in adapter.units if u.routed),
        "experts_per_unit": {str(e): n for e, n in sorted(counts.items())},
        "parameters": {**dict(totals), "total": sum(totals.values())},
        "units": units,
        "task_gates": gates,
        "task_id": task_id,
        "notices": list(adapter.notices),
    }
