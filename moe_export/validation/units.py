"""MoE-specific parity per routed unit: routing agreement, near-tie margins, and the routed op in isolation.

- Routing agreement: the fraction of tokens whose selected expert SET (experts with a gate above 1e-6)
  equals the reference's. Numeric drift can flip a token whose reference probabilities are nearly
  tied, so for the disagreeing tokens we report the reference margin: the k-th minus the (k+1)-th
  largest probability (k = the number of experts the reference selected for that token).
  End to end (each side's own forward) this is a diagnostic; re-running the reference router on the
  candidate's own input isolates the unit, and there a flip whose margin exceeds `margin_tol` cannot be
  explained by rounding and fails the unit.
- Op check: the candidate's GroupedLoRA output is recomputed from the candidate's own inputs (x, ids,
  gates) with the reference weights. This isolates the unit from upstream drift, so a wrong weight or a
  wrong kernel in one unit is named even when every later unit drifts too.
Legend: T tokens, E experts, K slots, R rank, D_in / D_out feature sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moe_export.ops.names import GROUPED_LORA
from moe_export.validation.parity import Tolerance
from moe_export.validation.routing_capture import UnitCapture

# A gate counts as selecting its expert above this magnitude. Routers that drop experts (top-p, dynamic)
# write exact zeros; dense routers (HydraLoRA, LoRAMoE) give every expert a probability, and a fp16/bf16
# export stores tiny ones as 0 (fp16's smallest subnormal is 6e-8), which an exact-zero test would read
# as a routing flip "with margin inf". A gate below 1e-6 moves the output by less than any tolerance.
SELECTED_GATE_MIN = 1e-6


def selection_mask(ids: np.ndarray, gates: np.ndarray | None, num_experts: int) -> np.ndarray:
    """[T, E] bool: expert e is selected for token t (|gate| > SELECTED_GATE_MIN; every id when gates are
    unknown)."""
    mask = np.zeros((ids.shape[0], num_experts), dtype=bool)  # [T, E]
    rows = np.arange(ids.shape[0])
    for j in range(ids.shape[1]):
        mask[rows, ids[:, j]] |= True if gates is None else np.abs(gates[:, j].astype(np.float64)) > SELECTED_GATE_MIN
    return mask


def topk_margins(probs: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """[T] reference margin p_(k) - p_(k+1), k = selected count per token; inf when every expert is selected."""
    ordered = -np.sort(-probs, axis=-1)  # [T, E] descending
    k = selected.sum(-1)  # [T]
    rows = np.arange(probs.shape[0])
    inside = (k >= 1) & (k < probs.shape[1])
    margins = np.full(probs.shape[0], np.inf)
    margins[inside] = ordered[rows[inside], k[inside] - 1] - ordered[rows[inside], k[inside]]
    return margins


@dataclass
class RoutingDiff:
    """Expert-set agreement of one routing against a reference routing, over some tokens."""

    tokens: int
    agreeing: int
    flip_margins: np.ndarray  # reference margins of the disagreeing tokens
    gate_max_abs: float | None  # gate error on agreeing tokens (None when gates are unknown)


def routing_diff(reference: UnitCapture, candidate: UnitCapture, keep: np.ndarray | None = None) -> RoutingDiff:
    """Compare expert sets token by token; `keep` ([T] bool) selects the tokens (None: all)."""
    num_experts = 1 + int(max(reference.expert_ids.max(initial=0), candidate.expert_ids.max(initial=0)))
    if reference.probs is not None:
        num_experts = max(num_experts, reference.probs.shape[1])
    ref_sel = selection_mask(reference.expert_ids, reference.gates, num_experts)  # [T, E]
    cand_gates = candidate.gates
    if cand_gates is None and reference.gates is not None and candidate.expert_ids.shape == reference.expert_ids.shape:
        # The slots op (MixLoRA) carries no gates. Its ids are the ranked experts, so take the candidate's first
        # m slots, m = the reference's kept count per token: exact for top-k, and for top-p it compares the kept
        # prefix instead of the full ranking (which is not a selection).
        kept = (reference.gates != 0).sum(-1, keepdims=True)  # [T, 1]
        cand_gates = np.arange(reference.gates.shape[1])[None, :] < kept  # [T, K] bool, the first m slots
    cand_sel = selection_mask(candidate.expert_ids, cand_gates, num_experts)  # [T, E]
    if keep is None or keep.shape != (ref_sel.shape[0],):
        keep = np.ones(ref_sel.shape[0], dtype=bool)  # [T]
    agree = (ref_sel == cand_sel).all(-1)[keep]  # [T_kept]
    gate_err = None
    if agree.any() and reference.gates is not None and candidate.gates is not None:
        ref_dense = _dense(reference, num_experts)[keep][agree]  # [T_agree, E]
        cand_dense = _dense(candidate, num_experts)[keep][agree]
        gate_err = float(np.abs(ref_dense - cand_dense).max())
    margins = np.zeros(0)
    if not agree.all() and reference.probs is not None:
        margins = topk_margins(reference.probs.astype(np.float64), ref_sel)[keep][~agree]
    return RoutingDiff(int(agree.size), int(agree.sum()), margins, gate_err)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass
class UnitComparison:
    """Accumulated over every compared input of one validation run.

    Two routing views: end to end (the reference's own forward vs the candidate's; upstream drift can
    legitimately flip near-ties, and after a real upstream error every later unit flips, so this is a
    diagnostic) and same-input (the reference router re-run on the candidate's own x: only a wrong
    router in this very unit makes it disagree beyond a near-tie, so this one gates).
    """

    name: str
    tokens: int = 0
    agreeing: int = 0
    min_flip_margin: float | None = None  # end to end: smallest reference margin among disagreeing tokens
    max_flip_margin: float | None = None  # end to end: largest (large + agreement < 1 = drift upstream or here)
    router_tokens: int = 0  # same-input router check
    router_agreeing: int = 0
    router_max_flip_margin: float | None = None
    gate_max_abs: float | None = None  # same-input gate error on agreeing tokens
    op_max_abs: float | None = None  # candidate op output vs reference weights on the candidate's inputs
    op_bound: float | None = None
    margin_tol: float = 0.0
    messages: list[str] = field(default_factory=list)

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.tokens if self.tokens else None

    @property
    def router_agreement(self) -> float | None:
        return self.router_agreeing / self.router_tokens if self.router_tokens else None

    @property
    def passed(self) -> bool:
        return not self.messages

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["agreement"] = self.agreement
        d["router_agreement"] = self.router_agreement
        d["passed"] = self.passed
        return d

    def add_routing(self, reference: UnitCapture, candidate: UnitCapture, tokens: np.ndarray | None = None) -> None:
        """End to end: the reference forward's routing vs the candidate's; `tokens` ([T] bool) to compare."""
        if reference.expert_ids.shape != candidate.expert_ids.shape:
            self.messages.append(
                f"expert_ids shape {list(candidate.expert_ids.shape)}, reference {list(reference.expert_ids.shape)}"
            )
            return
        diff = routing_diff(reference, candidate, tokens)
        self.tokens += diff.tokens
        self.agreeing += diff.agreeing
        if diff.flip_margins.size:
            self.min_flip_margin = _min(self.min_flip_margin, float(diff.flip_margins.min()))
            self.max_flip_margin = _max(self.max_flip_margin, float(diff.flip_margins.max()))

    def add_router_check(self, candidate: UnitCapture, route: Any) -> None:
        """Same input: `route(x) -> (ids, gates, probs)` is the reference router; compare with the candidate's."""
        if candidate.x is None:
            return
        ids, gates, probs = route(candidate.x)
        diff = routing_diff(UnitCapture(None, ids, gates, probs), candidate)
        self.router_tokens += diff.tokens
        self.router_agreeing += diff.agreeing
        if diff.flip_margins.size:
            self.router_max_flip_margin = _max(self.router_max_flip_margin, float(diff.flip_margins.max()))
        if candidate.gates is not None:
            self.gate_max_abs = _max(self.gate_max_abs, diff.gate_max_abs)

    def add_op_check(self, candidate: UnitCapture, expert_a: Any, expert_b: Any, tol: Tolerance) -> None:
        """Recompute the candidate's routed output from its inputs with the reference weights (fp64)."""
        if (
            candidate.x is None
            or candidate.output is None
            or candidate.gates is None
            or candidate.op_type != GROUPED_LORA
        ):
            return
        import torch

        from moe_export.ops.grouped_lora import grouped_lora_dense

        x = torch.from_numpy(candidate.x.astype(np.float64))  # [T, D_in]
        ids = torch.from_numpy(candidate.expert_ids.astype(np.int64))  # [T, K]
        gates = torch.from_numpy(candidate.gates.astype(np.float64))  # [T, K]
        expected = grouped_lora_dense(x, ids, gates, expert_a.double().cpu(), expert_b.double().cpu()).numpy()
        got = candidate.output.astype(np.float64)  # [T, D_out]
        if expected.shape != got.shape:
            self.messages.append(f"op output shape {list(got.shape)}, expected {list(expected.shape)}")
            return
        if not np.isfinite(got).all():
            self.messages.append(f"op output has {int((~np.isfinite(got)).sum())} NaN/Inf values")
            return
        err = float(np.abs(expected - got).max())
        bound = tol.bound(float(np.abs(expected).max()))
        self.op_max_abs = max(self.op_max_abs or 0.0, err)
        self.op_bound = bound if self.op_bound is None else max(self.op_bound, bound)
        if err > bound:
            self.messages.append(
                f"GroupedLoRA output differs from the reference weights on the same inputs: max abs {err:.3g} > "
                f"{bound:.3g} (wrong A/B initializer or kernel in this unit)"
            )

    def finish(self, gate_tol: float | None = None) -> None:
        """Turn accumulated statistics into a verdict (call once, after every input)."""
        if self.router_max_flip_margin is not None and self.router_max_flip_margin > self.margin_tol:
            self.messages.append(
                f"router disagrees on the same input (agreement {self.router_agreement:.4f}): a token flipped with "
                f"reference top-k margin {self.router_max_flip_margin:.3g} > {self.margin_tol:g} (not a near-tie)"
            )
        if gate_tol is not None and self.gate_max_abs is not None and self.gate_max_abs > gate_tol:
            self.messages.append(f"gates differ on the same input: max abs {self.gate_max_abs:.3g} > {gate_tol:g}")


def _dense(capture: UnitCapture, num_experts: int) -> np.ndarray:
    """[T, E] gate matrix (repeated ids add up, as in the op)."""
    assert capture.gates is not None
    dense = np.zeros((capture.expert_ids.shape[0], num_experts))
    rows = np.arange(capture.expert_ids.shape[0])
    for j in range(capture.expert_ids.shape[1]):
        np.add.at(dense, (rows, capture.expert_ids[:, j]), capture.gates[:, j].astype(np.float64))
    return dense
