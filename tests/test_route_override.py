"""The reference's route override: replaying a forward's own decisions reproduces it bit for bit, and a replayed
decision is computed with the family's gate formula (checked by hand), not copied."""

from __future__ import annotations

import pytest
import torch

import moe_export
from moe_export.ir import Router
from moe_export.reference.model import force_routing, moe_modules
from moe_export.reference.routing import ForcedRoute, select_experts, select_forced
from tests.conftest import SAMPLES


def _forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def _own_routes(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, ForcedRoute]:
    routes: dict[str, ForcedRoute] = {}
    hooked = [m for _, m in moe_modules(model) if getattr(m, "router", None) is not None]

    def record(name: str, _x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> None:
        routes[name] = ForcedRoute(expert_ids.clone(), gates != 0)

    for module in hooked:
        module.record_routing = record
    try:
        _forward(model, ids)
    finally:
        for module in hooked:
            module.record_routing = None
    return routes


# One per routing kind: per-linear top-k (goat), top-k MixLoRA block (mixlora), top-p block (mixlora_dynamic),
# dense soft routing (hydralora), task-gated (mmoelora).
@pytest.mark.parametrize("sample", ["goat", "mixlora", "mixlora_dynamic", "hydralora", "mmoelora"])
def test_forcing_own_routing_reproduces_logits_exactly(sample: str) -> None:
    loaded = moe_export.load(
        SAMPLES / sample, base_model=SAMPLES / "tiny-llama", task_id=0 if sample == "mmoelora" else None
    )
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    own = _forward(loaded.model, ids)
    routes = _own_routes(loaded.model, ids)
    if sample != "mmoelora":
        assert routes, "the sample has token-routed units"
    with force_routing(loaded.model, routes):
        replayed = _forward(loaded.model, ids)
    assert torch.equal(own, replayed)
    if sample in ("goat", "mixlora"):  # a different decision must change the logits (the override is live)
        other = {n: ForcedRoute(r.expert_ids.flip(0), r.kept) for n, r in routes.items()}
        with force_routing(loaded.model, other):
            assert not torch.equal(own, _forward(loaded.model, ids))
    assert all(getattr(m, "forced_route", None) is None for _, m in moe_modules(loaded.model))


def test_forced_gates_follow_the_family_formula() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    topk = Router(kind="linear", num_experts=4, select="topk", top_k=2, renormalize=True, weight=torch.zeros(4, 1))
    ids, gates = select_forced(topk, probs, ForcedRoute(torch.tensor([[2, 0]]), torch.ones(1, 2, dtype=torch.bool)))
    assert ids.tolist() == [[2, 0]]
    torch.testing.assert_close(gates, torch.tensor([[0.15 / 0.65, 0.5 / 0.65]]))
    top_p = Router(kind="linear", num_experts=4, select="top_p", top_p=0.7, weight=torch.zeros(4, 1))
    order = torch.tensor([[0, 1, 2, 3]])
    own_ids, own_gates = select_experts(top_p, probs)  # keeps 0.5, 0.3 (cumulative 0.8 > 0.7 after the second)
    assert own_ids.tolist() == order.tolist()
    torch.testing.assert_close(own_gates, torch.tensor([[0.5, 0.3, 0.0, 0.0]]))
    kept = torch.tensor([[True, True, True, False]])  # a candidate that kept one more expert
    _, gates = select_forced(top_p, probs, ForcedRoute(order, kept))
    torch.testing.assert_close(gates, torch.tensor([[0.5, 0.3, 0.15, 0.0]]))
