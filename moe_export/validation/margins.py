"""How far a routing decision is from flipping, and how far rounding can move it: the near-tie test.

A routing decision is a function of the router probabilities p = softmax(G x + b) (fp32, every family).
Its **margin** is the smallest change of p that would change the selected expert set:

- top-k (switch / top-1 is k = 1): p_(k) - p_(k+1), the k-th minus the (k+1)-th largest probability;
- top-p (MixLoRA dynamic): with s the sorted (tempered) probabilities, c their cumulative sums and n the
  kept count, the decision is `c_(n-1) <= top_p < c_n` and the order of s_n, s_(n+1); the margin is the
  smallest of top_p - c_(n-1), c_n - top_p and s_n - s_(n+1) (both sides of the threshold);
- dense and task routing decide nothing: margin inf.

Its **bound** is how far the probabilities can move given the candidate's own router input x_c. Every router
logit l_e = G_e x moves by at most d_e = sum_i |G_ei| (|x_c - x_r|_i + KAPPA u |x_c|_i): the first term is the
exact effect of the input the reference saw instead (zero on the same-input check), the second the rounding of
the router matmul in the export's dtype (u its unit roundoff). With every logit within d = max_e d_e, each
probability stays within a factor exp(+-2d), so p_(k) - p_(k+1) cannot close by more than
(p_(k) + p_(k+1)) (exp(2d) - 1), and a cumulative sum c not by more than c (exp(2d) - 1). The fp32 softmax
itself (and the top-p cumulative sum) is evaluated in a different order on each side: each probability carries
up to (E + 3) fp32 roundings (exp, the E-term sum, the division), added to the relative growth.
A flip whose margin is within its bound is a near-tie (rounding can explain it); any other is an error.
Legend: T tokens, E experts, K slots, D_in router input size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Unit roundoff of each export dtype (half the machine epsilon).
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}
# Roundings per router logit in the candidate: the stored router weight, each product, the accumulation (ONNX
# Runtime accumulates low-precision MatMuls in fp32 on CPU, one rounding at the end, but a GPU kernel may round a
# partial sum once more) and the logit's own cast. 4 covers one of each; a linear-in-D_in accumulation bound
# would excuse real errors in wide routers and is not what any runtime does.
KAPPA = 4.0


def logit_drift(weight: np.ndarray, x_cand: np.ndarray, x_ref: np.ndarray | None, unit_roundoff: float) -> np.ndarray:
    """[T] d = max_e sum_i |G_ei| (|x_c - x_r|_i + KAPPA u |x_c|_i) (x_r None: the same-input check)."""
    x_c = np.abs(x_cand.astype(np.float64))  # [T, D_in]
    spread = KAPPA * unit_roundoff * x_c
    if x_ref is not None:
        spread = spread + np.abs(x_cand.astype(np.float64) - x_ref.astype(np.float64))
    return (spread @ np.abs(weight.astype(np.float64)).T).max(axis=-1)  # [T]


@dataclass(frozen=True)
class Decision:
    """The routing rule the margins are measured against (ir.Router's selection fields)."""

    select: str  # "topk", "top_p" or "dense"
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 0.0


def margins_and_bounds(decision: Decision, probs: np.ndarray, drift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([T] margin, [T] bound) of each token's decision; the pair whose margin is closest to its bound."""
    tokens, experts = probs.shape
    growth = np.expm1(2.0 * drift) + (experts + 3) * UNIT_ROUNDOFF["fp32"]  # [T] relative movement of p
    if decision.select == "dense" or tokens == 0:
        return np.full(tokens, np.inf), np.zeros(tokens)
    ordered = -np.sort(-probs.astype(np.float64), axis=-1)  # [T, E] descending
    if decision.select == "topk":
        k = int(decision.top_k or 1)
        if k >= ordered.shape[1]:
            return np.full(tokens, np.inf), np.zeros(tokens)
        high, low = ordered[:, k - 1], ordered[:, k]
        return high - low, (high + low) * growth
    return _top_p_margins(decision, ordered, growth)


def _top_p_margins(decision: Decision, ordered: np.ndarray, growth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The three decision terms of a top-p selection (see the module docstring); the tightest per token."""
    assert decision.top_p is not None
    if decision.temperature > 0:
        ordered = ordered / decision.temperature
    tokens, experts = ordered.shape
    cumulative = np.cumsum(ordered, axis=-1)  # [T, E]
    # kept count n: slot j is kept when j == 0 or c_(j-1) <= top_p (reference/routing.py `_top_p`)
    kept = 1 + (cumulative[:, :-1] <= decision.top_p).sum(-1)  # [T]
    rows = np.arange(tokens)
    inf = np.full(tokens, np.inf)
    terms = []
    below = kept >= 2  # the last kept slot was admitted: c_(n-1) <= top_p
    c_below = cumulative[rows, np.maximum(kept - 2, 0)]
    terms.append((np.where(below, decision.top_p - c_below, inf), c_below * growth))
    above = kept < experts  # the first dropped slot was refused: c_n > top_p
    c_above = cumulative[rows, np.minimum(kept - 1, experts - 1)]
    terms.append((np.where(above, c_above - decision.top_p, inf), c_above * growth))
    s_last = ordered[rows, kept - 1]
    s_next = ordered[rows, np.minimum(kept, experts - 1)]
    terms.append((np.where(above, s_last - s_next, inf), (s_last + s_next) * growth))
    margins = np.stack([m for m, _ in terms])  # [3, T]
    bounds = np.stack([b for _, b in terms])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bounds > 0, margins / bounds, np.where(margins > 0, np.inf, 0.0))
    pick = ratio.argmin(0)  # [T]
    return margins[pick, rows], bounds[pick, rows]
