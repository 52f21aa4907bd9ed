"""Router math in one place: logits -> softmax -> selection -> (expert_ids [T, K], gates [T, K]).

Every family routes with a softmax; they differ in the matmul dtype, the selection and the
renormalisation (docs/formats.md, per family). The softmax runs in fp32 in every family.
Legend: T tokens, E experts, K slots per token, D_in router input size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_export.ir import Router


def router_dtype(router: Router, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the original code runs the router matmul in."""
    return model_dtype if router.compute_dtype == "model" else getattr(torch, router.compute_dtype)


def router_probabilities(
    router: Router, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """[T, E] fp32 softmax of the router logits; x is [T, D_in], weight [E, D_in]."""
    dtype = router_dtype(router, x.dtype)
    logits = x.to(dtype) @ weight.to(dtype).T  # [T, E]
    if bias is not None:
        logits = logits + bias.to(dtype)
    return torch.softmax(logits.float(), dim=-1)


def select_experts(router: Router, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_ids [T, K] int64, gates [T, K] fp32) from fp32 probabilities [T, E]."""
    num_tokens, num_experts = probs.shape
    if router.select == "topk":
        assert router.top_k is not None
        gates, ids = torch.topk(probs, router.top_k, dim=-1)  # [T, K]
        if router.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return ids, gates
    if router.select == "top_p":
        return _top_p(router, probs)
    ids = torch.arange(num_experts, device=probs.device).expand(num_tokens, num_experts)  # [T, E]
    gates = probs / probs.sum(dim=-1, keepdim=True) if router.renormalize else probs
    return ids, gates


def _top_p(router: Router, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MixLoRA dynamic routing: keep the experts (sorted by probability) whose cumulative mass is <= p,
    plus the first one past p; the weights are the kept probabilities, not renormalised. A positive
    temperature divides the probabilities before the cumulative sum (MoE-PEFT's quirk, kept)."""
    assert router.top_p is not None
    if router.temperature > 0:
        probs = probs / router.temperature
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)  # [T, E]
    over = torch.cumsum(sorted_p, dim=-1) > router.top_p  # [T, E]
    # Keep slot j unless the mass up to slot j-1 already exceeds p. Shifting `over` (instead of
    # subtracting sorted_p from the cumsum) compares the very sums moe-peft's `_dynamic_top_p` compares.
    keep = torch.cat([torch.ones_like(over[:, :1]), ~over[:, :-1]], dim=-1)  # [T, E]
    return order, torch.where(keep, sorted_p, torch.zeros_like(sorted_p))


@dataclass(frozen=True)
class ForcedRoute:
    """Another forward's routing decisions for one unit, to be replayed (validation's route override).

    Only the decisions are replayed (which experts, in which slot order, which slots carry weight); the
    gate values are still computed from this forward's own probabilities, so the arithmetic of the gates
    is compared, not copied.
    """

    expert_ids: torch.Tensor  # [T, K] int64
    kept: torch.Tensor  # [T, K] bool: slots given a nonzero weight (all True for top-k)


def select_forced(router: Router, probs: torch.Tensor, forced: ForcedRoute) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_ids [T, K], gates [T, K]) with `forced`'s decisions and the gate formula of `select_experts`."""
    if router.select == "dense":
        return select_experts(router, probs)  # nothing is decided: every expert, every token
    ids = forced.expert_ids.to(device=probs.device, dtype=torch.int64)
    if ids.shape[0] != probs.shape[0] or ids.shape[1] != router.slots:
        raise ValueError(
            f"forced routing {list(ids.shape)} does not fit {probs.shape[0]} tokens x {router.slots} slots"
        )
    kept = forced.kept.to(probs.device)
    if router.select == "top_p" and router.temperature > 0:
        probs = probs / router.temperature  # as _top_p: the kept weights are the tempered probabilities
    gates = torch.where(kept, probs.gather(1, ids), torch.zeros((), dtype=probs.dtype, device=probs.device))
    if router.select == "topk" and router.renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return ids, gates


def route_tokens(
    router: Router,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    forced: ForcedRoute | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise routing of x [T, D_in] -> (expert_ids [T, K], gates [T, K]); `forced` replays decisions."""
    probs = router_probabilities(router, x, weight, bias)
    return select_experts(router, probs) if forced is None else select_forced(router, probs, forced)


def route_constant(router: Router, weights: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-independent routing (MOELoRA for a fixed task): every token gets the same [E] weights."""
    return select_experts(router, weights.float().expand(num_tokens, -1))
