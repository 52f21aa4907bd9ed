"""Generation parity of a KV-cache decoder export: the default prompts, and greedy tokens and per-step logits
compared with the torch reference's (the decoding loops themselves are in runtimes/decoding.py).

A token mismatch is a **near-tie** when the reference's logits of its own token and of the candidate's
token differ by no more than the logits tolerance: numerically equal choices, reported, not failed; that
row is not compared further (its prefix differs from then on). Any other mismatch, or a step whose logits
exceed the tolerance, fails and names the first bad step and row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moe_export.runtimes.decoding import Decoded, Prompts
from moe_export.validation.parity import Tolerance

DEFAULT_NEW_TOKENS = 16
PROMPT_LENGTH = 7
PADDED_LENGTHS = (7, 4, 5)  # a right-padded batch: rows shorter than the longest are padded on the right


def default_prompts(vocab: int, pad_id: int, seed: int = 0) -> list[Prompts]:
    """Batch 1 of PROMPT_LENGTH random tokens, and a right-padded batch of PADDED_LENGTHS."""
    rng = np.random.default_rng([seed, 13])
    single = rng.integers(0, vocab, size=(1, PROMPT_LENGTH), dtype=np.int64)
    width = max(PADDED_LENGTHS)
    ids = np.full((len(PADDED_LENGTHS), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(PADDED_LENGTHS):
        ids[row, :length] = rng.integers(0, vocab, size=length)
        mask[row, :length] = 1
    return [
        Prompts(f"1x{PROMPT_LENGTH}", single, np.ones_like(single)),
        Prompts(f"{len(PADDED_LENGTHS)}x{width} right-padded", ids, mask),
    ]


@dataclass
class GenerationComparison:
    """One runtime on one prompt batch: tokens and per-step logits against the reference."""

    runtime: str
    label: str
    new_tokens: int
    passed: bool
    max_abs: float  # over the compared steps' logits
    bound: float  # atol + rtol * max|reference logits|
    first_bad_step: int | None = None
    first_bad_row: int | None = None
    near_ties: list[str] = field(default_factory=list)  # "row r step t"
    message: str = ""
    reference_tokens: list[list[int]] = field(default_factory=list)
    candidate_tokens: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_generation(
    runtime: str, label: str, reference: Decoded, candidate: Decoded, tol: Tolerance
) -> GenerationComparison:
    """Token-for-token and per-step logits comparison; see the module docstring for near-ties."""
    steps, rows = reference.tokens.shape[1], reference.tokens.shape[0]
    scale = float(np.abs(reference.logits).max())
    bound = tol.bound(scale)
    live = np.ones(rows, dtype=bool)  # rows still on the same prefix
    max_abs, near_ties = 0.0, []
    bad: tuple[int, int, str] | None = None
    for step in range(steps):
        diff = np.abs(reference.logits[step] - candidate.logits[step]).max(-1)  # [B]
        diff = np.where(live, diff, 0.0)
        max_abs = max(max_abs, float(diff.max()))
        if bad is None and (diff > bound).any():
            row = int(np.argmax(diff > bound))
            bad = (step, row, f"logits differ by {float(diff[row]):.3g} > {bound:.3g}")
        for row in np.flatnonzero(live):
            want, got = int(reference.tokens[row, step]), int(candidate.tokens[row, step])
            if want == got:
                continue
            gap = float(reference.logits[step, row, want] - reference.logits[step, row, got])
            live[row] = False
            if gap <= bound:
                near_ties.append(f"row {row} step {step} (reference margin {gap:.3g})")
            elif bad is None:
                bad = (step, int(row), f"token {got} instead of {want} (reference margin {gap:.3g})")
        if bad is not None:
            break
    result = GenerationComparison(
        runtime,
        label,
        steps,
        bad is None,
        max_abs,
        bound,
        near_ties=near_ties,
        reference_tokens=reference.tokens.tolist(),
        candidate_tokens=candidate.tokens.tolist(),
    )
    if bad is not None:
        result.first_bad_step, result.first_bad_row, reason = bad
        result.message = f"{label}: first bad step {bad[0]} (row {bad[1]}): {reason}"
    return result
