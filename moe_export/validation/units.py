"""MoE-specific parity per routed unit, under route replay: every routing flip judged, every routed op checked.

The reference runs with the candidate's routing decisions replayed (reference.force_routing), so the logits
comparison sees only arithmetic. The decisions are judged here, unit by unit, on each side's own input:

- **Flips**: at each unit the reference also records the decision it would have made itself (on its input x_r,
  which under replay differs from the candidate's x_c only by arithmetic drift). Every token whose selected
  expert set differs from the candidate's is a flip; it is a near-tie, and passes, when its reference margin
  is within the bound of how far the probabilities can move between x_r and x_c plus the router's rounding in
  the export dtype (validation/margins.py). Any other flip fails and is named (unit, input, row, position).
- **Same-input router check**: the reference router re-run on x_c must choose what the candidate chose, up to
  the rounding bound alone (no drift term), and give the same gates.
- **Op check**: each routed node's output (GroupedLoRA, GroupedLoRASlots, or the fused forms: GroupedLoRAAdd and
  RoutedGroupedLoRA(Add), whose delta is their output less their base) is recomputed from the candidate's own
  inputs and routing with the reference weights (fp64), so a wrong expert weight is named in its unit even when
  every later unit drifts too.
Legend: T tokens, E experts, K slots, R rank, D_in / D_out feature sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moe_export.ops.names import (
    GATED_OP_TYPES,
    GROUPED_LORA_ADD,
    GROUPED_LORA_SLOTS,
    ROUTED_GROUPED_LORA_ADD,
    ROUTED_OP_TYPES,
)
from moe_export.runtimes.taps import UnitCapture
from moe_export.validation.margins import Decision, logit_drift, margins_and_bounds
from moe_export.validation.parity import Tolerance

# A gate counts as selecting its expert above this magnitude. Routers that drop experts (top-p, dynamic)
# write exact zeros; dense routers (HydraLoRA, LoRAMoE) give every expert a probability, and a fp16/bf16
# export stores tiny ones as 0 (fp16's smallest subnormal is 6e-8), which an exact-zero test would read
# as a routing flip "with margin inf". A gate below 1e-6 moves the output by less than any tolerance.
SELECTED_GATE_MIN = 1e-6
FUSED_RESIDUAL_OP_TYPES = (GROUPED_LORA_ADD, ROUTED_GROUPED_LORA_ADD)  # output = base + delta
MAX_LISTED_FLIPS = 200  # per unit and check; the counts stay exact beyond it


def selection_mask(ids: np.ndarray, gates: np.ndarray | None, num_experts: int) -> np.ndarray:
    """[T, E] bool: expert e is selected for token t (|gate| > SELECTED_GATE_MIN; every id when gates are
    unknown, or a [T, K] bool of kept slots)."""
    mask = np.zeros((ids.shape[0], num_experts), dtype=bool)  # [T, E]
    rows = np.arange(ids.shape[0])
    for j in range(ids.shape[1]):
        if gates is None:
            keep: Any = True
        elif gates.dtype == bool:
            keep = gates[:, j]
        else:
            keep = np.abs(gates[:, j].astype(np.float64)) > SELECTED_GATE_MIN
        mask[rows, ids[:, j]] |= keep
    return mask


def kept_slots(candidate: UnitCapture, own_route_gates: np.ndarray | None, select: str = "top_p") -> np.ndarray:
    """[T, K] bool: the candidate's slots that carry weight. Top-k keeps its K slots whatever their gates (a tiny
    renormalised gate is still a choice). Otherwise a slot is kept by its gate; without gates (GroupedLoRASlots:
    MixLoRA applies them after the op) the slots are ranked experts: keep the first m, m = the count the
    reference router keeps on the candidate's own input (the kept prefix of the candidate's ranking)."""
    ids = candidate.expert_ids
    if select == "topk":
        return np.ones(ids.shape, dtype=bool)
    if candidate.gates is not None:
        return np.abs(candidate.gates.astype(np.float64)) > SELECTED_GATE_MIN
    if own_route_gates is None:
        return np.ones(ids.shape, dtype=bool)
    kept = (own_route_gates != 0).sum(-1, keepdims=True)  # [T, 1]
    return np.arange(ids.shape[1])[None, :] < kept


@dataclass(frozen=True)
class Flip:
    """One token-unit where the candidate chose other experts than the reference."""

    unit: str
    input: str  # the input's label (shape, or "generation ... step N")
    row: int
    position: int
    margin: float  # the reference's decision margin (probability)
    bound: float  # how far rounding (and drift) can move it
    same_input: bool = False  # the reference router on the candidate's own input

    @property
    def near_tie(self) -> bool:
        return self.margin <= self.bound

    def describe(self) -> str:
        where = "same-input " if self.same_input else ""
        relation = "<=" if self.near_tie else ">"
        return (
            f"{where}flip at {self.input} row {self.row} position {self.position}: reference margin "
            f"{self.margin:.3g} {relation} bound {self.bound:.3g}"
        )


@dataclass
class TokenLayout:
    """Which flat token is which: [T] = B rows of S positions, and the ones to compare (None: all)."""

    label: str
    seq: int
    valid: np.ndarray | None = None  # [T] bool

    def where(self, token: int) -> tuple[int, int]:
        return token // self.seq, token % self.seq


@dataclass
class UnitComparison:
    """One candidate unit accumulated over every compared input of one validation run."""

    name: str
    tokens: int = 0  # routed tokens compared (not padded)
    flips: list[Flip] = field(default_factory=list)
    flip_count: int = 0
    router_tokens: int = 0  # same-input router check
    router_flips: list[Flip] = field(default_factory=list)
    router_flip_count: int = 0
    gate_max_abs: float | None = None  # same-input gate error on agreeing tokens
    op_max_abs: float | None = None  # candidate op output vs reference weights on the candidate's inputs
    op_bound: float | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def agreement(self) -> float | None:
        return (self.tokens - self.flip_count) / self.tokens if self.tokens else None

    @property
    def router_agreement(self) -> float | None:
        return (self.router_tokens - self.router_flip_count) / self.router_tokens if self.router_tokens else None

    @property
    def largest_flip(self) -> Flip | None:
        """The flip closest to failing (largest margin / bound), both checks together."""
        flips = self.flips + self.router_flips
        return max(flips, key=lambda f: f.margin / f.bound if f.bound > 0 else np.inf) if flips else None

    @property
    def passed(self) -> bool:
        return not self.messages

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(agreement=self.agreement, router_agreement=self.router_agreement, passed=self.passed)
        return d

    def add_flips(self, flips: list[Flip], tokens: int, same_input: bool) -> None:
        if same_input:
            self.router_tokens += tokens
            self.router_flip_count += len(flips)
            self.router_flips += flips[: max(0, MAX_LISTED_FLIPS - len(self.router_flips))]
        else:
            self.tokens += tokens
            self.flip_count += len(flips)
            self.flips += flips[: max(0, MAX_LISTED_FLIPS - len(self.flips))]
        for flip in flips:
            if not flip.near_tie:
                self.messages.append(f"routing {flip.describe()} (not a near-tie)")

    def add_gate_error(self, error: float | None) -> None:
        if error is not None:
            self.gate_max_abs = error if self.gate_max_abs is None else max(self.gate_max_abs, error)

    def add_op_check(self, candidate: UnitCapture, expert_a: Any, expert_b: Any, tol: Tolerance, node: str) -> None:
        """Recompute one node's output from its own inputs with the reference weights (fp64)."""
        expected = op_expected(candidate, expert_a, expert_b)
        if expected is None:
            return
        assert candidate.output is not None
        got, add_rounding = candidate_delta(candidate)
        if expected.shape != got.shape:
            self.messages.append(f"{node}: op output shape {list(got.shape)}, expected {list(expected.shape)}")
            return
        if not np.isfinite(got).all():
            self.messages.append(f"{node}: op output has {int((~np.isfinite(got)).sum())} NaN/Inf values")
            return
        err = float(np.abs(expected - got).max()) if got.size else 0.0
        bound = tol.bound(float(np.abs(expected).max()) if got.size else 0.0) + add_rounding
        self.op_max_abs = max(self.op_max_abs or 0.0, err)
        self.op_bound = bound if self.op_bound is None else max(self.op_bound, bound)
        if err > bound:
            self.messages.append(
                f"{candidate.op_type} node {node} differs from the reference weights on its own inputs: max abs "
                f"{err:.3g} > {bound:.3g} (wrong A/B initializer, scaling or kernel in this unit)"
            )

    def finish(self, gate_tol: float | None = None) -> None:
        """Turn accumulated statistics into a verdict (call once, after every input)."""
        if gate_tol is not None and self.gate_max_abs is not None and self.gate_max_abs > gate_tol:
            self.messages.append(f"gates differ on the same input: max abs {self.gate_max_abs:.3g} > {gate_tol:g}")


def candidate_delta(candidate: UnitCapture) -> tuple[np.ndarray, float]:
    """The op's routed delta as the candidate computed it, in fp64, and how far rounding can move it beyond the
    op's own arithmetic. A fused-residual node outputs base + delta in the export dtype: its delta is the output
    less its base, off by at most the final add's rounding (half an ulp of the output; eps * max |output| bounds
    it), which the op check allows on top of its tolerance; the bound stays relative to the delta, so a wrong
    expert is not hidden behind the base's magnitude."""
    assert candidate.output is not None
    got = candidate.output.astype(np.float64)
    if candidate.base is None:
        return got, 0.0
    got = got - candidate.base.astype(np.float64)  # [T, D_out] (captures_from_outputs flattened both)
    largest = float(np.abs(candidate.output.astype(np.float64)).max()) if got.size else 0.0
    return got, float(np.finfo(candidate.output.dtype).eps) * largest


def op_expected(candidate: UnitCapture, expert_a: Any, expert_b: Any) -> np.ndarray | None:
    """The op's routed delta recomputed in fp64 from the candidate's inputs; None when the taps do not allow it."""
    if candidate.x is None or candidate.output is None:
        return None
    if candidate.op_type in FUSED_RESIDUAL_OP_TYPES and candidate.base is None:
        return None
    import torch

    x = torch.from_numpy(candidate.x.astype(np.float64))  # [T, D_in]
    ids = torch.from_numpy(candidate.expert_ids.astype(np.int64))  # [T, K]
    a, b = expert_a.double().cpu(), expert_b.double().cpu()
    if candidate.op_type in GATED_OP_TYPES + ROUTED_OP_TYPES and candidate.gates is not None:
        from moe_export.ops.grouped_lora import grouped_lora_dense

        gates = torch.from_numpy(candidate.gates.astype(np.float64))  # [T, K]
        return grouped_lora_dense(x, ids, gates, a, b).numpy()
    if candidate.op_type == GROUPED_LORA_SLOTS:
        from moe_export.ops.grouped_lora_slots import grouped_lora_slots_dense

        return grouped_lora_slots_dense(x, ids, a, b).numpy()
    return None


def decision_of(router: Any) -> Decision:
    return Decision(router.select, router.top_k, router.top_p, router.temperature)


def judge_flips(
    unit: str,
    decision: Decision,
    chosen: np.ndarray,
    reference: UnitCapture,
    weight: np.ndarray,
    x_cand: np.ndarray,
    x_ref: np.ndarray | None,
    unit_roundoff: float,
    layout: TokenLayout,
) -> tuple[list[Flip], int]:
    """Flips of the candidate's selection `chosen` [T, E] against the reference's decision (with probs), and the
    number of tokens compared. `x_ref` None: the same-input check (rounding bound only)."""
    assert reference.probs is not None
    own_gates = None if decision.select == "topk" else reference.gates  # top-k: the ids are the choice
    own = selection_mask(reference.expert_ids, own_gates, chosen.shape[1])  # [T, E]
    keep = layout.valid if layout.valid is not None and layout.valid.shape == (own.shape[0],) else None
    if decision.select == "dense":  # every expert, every token: nothing decided, nothing can flip
        return [], int(own.shape[0] if keep is None else keep.sum())
    if own.shape != chosen.shape:
        return [], 0
    differs = (own != chosen).any(-1)
    if keep is not None:
        differs &= keep
    flipped = np.flatnonzero(differs)
    tokens = int(own.shape[0] if keep is None else keep.sum())
    if flipped.size == 0:
        return [], tokens
    drift = logit_drift(weight, x_cand[flipped], None if x_ref is None else x_ref[flipped], unit_roundoff)
    margins, bounds = margins_and_bounds(decision, reference.probs[flipped], drift)
    flips = [
        Flip(unit, layout.label, *layout.where(int(t)), float(m), float(b), same_input=x_ref is None)
        for t, m, b in zip(flipped, margins, bounds, strict=True)
    ]
    return flips, tokens
