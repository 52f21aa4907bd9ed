"""The independent parity oracle: per-token Python loops over experts, written from the papers' formulas.

It shares no routing or op code with moe_export: softmax, top-k, renormalisation and the expert sum
are spelled out here per token, as the original code bases do.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_export.ir import Adapter, LinearMoE


class LoopLinear(nn.Module):
    def __init__(self, base: nn.Linear, unit: LinearMoE, task_weights: torch.Tensor | None) -> None:
        super().__init__()
        self.base, self.unit, self.task_weights = base, unit, task_weights

    def expert_weights(self, x: torch.Tensor) -> dict[int, float]:
        """{expert: weight} for one token, from the formulas in docs/formats.md."""
        router = self.unit.router
        assert router is not None
        if router.kind == "task":
            probs = self.task_weights.double()
        else:
            w = router.weight.double() if router.compute_dtype == "float32" else router.weight.to(x.dtype)
            logits = (w @ x.to(w.dtype)).double()
            if router.bias is not None:
                logits = logits + router.bias.double()
            probs = torch.exp(logits - logits.max())
            probs = probs / probs.sum()
        num_experts = probs.shape[0]
        if router.select == "dense":
            chosen = list(range(num_experts))
        elif router.select == "topk":
            chosen = sorted(range(num_experts), key=lambda e: -float(probs[e]))[: router.top_k]
        else:  # top_p: sorted experts until the mass before one exceeds p
            order = sorted(range(num_experts), key=lambda e: -float(probs[e]))
            scaled = probs / router.temperature if router.temperature > 0 else probs
            chosen, mass = [], 0.0
            for e in order:
                if mass > router.top_p:
                    break
                chosen.append(e)
                mass += float(scaled[e])
            probs = scaled
        weights = {e: float(probs[e]) for e in chosen}
        if router.renormalize:
            total = sum(weights.values())
            weights = {e: v / total for e, v in weights.items()}
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x).double()
        flat = x.reshape(-1, x.shape[-1]).double()
        out = y.reshape(-1, y.shape[-1]).clone()
        unit = self.unit
        for t in range(flat.shape[0]):
            xt = flat[t]
            for s in unit.shared:
                out[t] += s.scaling * (s.B.double() @ (s.A.double() @ xt))
            if unit.experts is None:
                continue
            stack = unit.experts
            for e, w in self.expert_weights(x.reshape(-1, x.shape[-1])[t]).items():
                a = stack.A[0 if stack.A.shape[0] == 1 else e].double()
                out[t] += w * float(stack.scaling[e]) * (stack.B[e].double() @ (a @ xt))
        return out.view(*y.shape).to(x.dtype)


def apply_loop_reference(model: nn.Module, adapter: Adapter, task_id: int | None = None) -> nn.Module:
    """Replace each adapted Linear with the loop oracle (linear units only; block units bring their own)."""
    for unit in adapter.units:
        assert isinstance(unit, LinearMoE), "the loop oracle for FFN units lives with their family tests"
        parent_name, _, child = unit.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        task_weights = None
        if unit.router is not None and unit.router.kind == "task":
            task_weights = adapter.task_gates[unit.router.task_gate].weights(task_id)
        setattr(parent, child, LoopLinear(getattr(parent, child), unit, task_weights))
    return model
