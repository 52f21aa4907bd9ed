"""Generation parity under route replay: the candidate decodes greedily (tapping its units at every step), then the
reference replays the candidate's tokens and routing step by step.

- Logits: every step's next-token logits against the replayed reference's, on every row (the replay keeps both
  on the candidate's prefix, so no row drops out after a divergence).
- Routing: every step's flips are judged like the scoring flips (validation/units.py); one above its bound fails.
- Tokens: the candidate's greedy token must be the replayed reference's argmax up to a logits near-tie.
- Divergence from the free-running reference (transformers `generate` / the explicit-cache loop, its own
  routing): accepted only where it starts at a near-tie, i.e. a routing flip within its bound on that row at or
  before the step, or a reference logit gap between the two tokens within the logits bound; it is reported as
  (step, row, unit, margin). Any other divergence fails.
Without taps (a runtime that cannot tap, or no torch reference) the free-running comparison alone decides.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_export.reference.model import ReferenceUnit
from moe_export.runtimes.base import Runner
from moe_export.runtimes.decoding import Decoded, Prompts, greedy_decode, torch_greedy, torch_reference
from moe_export.validation.generation import GenerationComparison, compare_generation
from moe_export.validation.parity import Tolerance
from moe_export.validation.replay import compare_taps, first_diverging_unit, forced_routes
from moe_export.validation.results import DecodeResult
from moe_export.validation.units import Flip, TokenLayout, UnitComparison


def decode_candidate(
    runner: Runner, manifest: Any, prompts: list[Prompts], new_tokens: int, taps: bool
) -> list[DecodeResult]:
    """Greedy decoding of every prompt batch on an inactive runner (activated here), tapping when asked and able."""
    if taps:
        runner.request_taps()
    with runner:
        decoded = [greedy_decode(runner, manifest, p, new_tokens) for p in prompts]
    return [DecodeResult(p.label, d.tokens, d.logits, d.taps) for p, d in zip(prompts, decoded, strict=True)]


def check_generation(
    model: Any,
    runtime: str,
    decoded: list[DecodeResult],
    prompts: list[Prompts],
    tol: Tolerance,
    pad_id: int,
    units: dict[str, ReferenceUnit],
    export_dtype: str,
) -> list[GenerationComparison]:
    """One comparison per prompt batch of a candidate's decodes against the torch reference `model`."""
    results = []
    for prompt, got in zip(prompts, decoded, strict=True):
        steps = got.tokens.shape[1]
        free = torch_reference(model, prompt, steps, pad_id)
        candidate = Decoded(got.tokens, got.logits)
        if not units or len(got.step_taps) != steps:
            results.append(compare_generation(runtime, prompt.label, free, candidate, tol))
            continue
        routes = [forced_routes(taps, units) for taps in got.step_taps]
        replayed = torch_greedy(model, prompt, steps, forced_tokens=got.tokens, routes=routes)
        results.append(_judge_replayed(runtime, prompt, got, free, replayed, units, export_dtype, tol))
    return results


def _judge_replayed(
    runtime: str,
    prompt: Prompts,
    got: DecodeResult,
    free: Decoded,
    replayed: Decoded,
    units: dict[str, ReferenceUnit],
    export_dtype: str,
    tol: Tolerance,
) -> GenerationComparison:
    steps, width = got.tokens.shape[1], prompt.input_ids.shape[1]
    problems: list[tuple[int, int, str]] = []
    flips: list[Flip] = []
    for step in range(steps):
        per_unit: dict[str, UnitComparison] = {}
        layout = TokenLayout(f"{prompt.label} step {step}", width if step == 0 else 1)
        compare_taps(per_unit, got.step_taps[step], replayed.taps[step], units, export_dtype, tol, layout)
        problems += [(step, 0, f"unit {u.name}: {m}") for u in per_unit.values() for m in u.messages]
        flips += [f for u in per_unit.values() for f in u.flips + u.router_flips]
    bound = tol.bound(float(np.abs(replayed.logits).max()))
    diff = np.abs(replayed.logits.astype(np.float64) - got.logits.astype(np.float64)).max(-1)  # [N, B]
    result = GenerationComparison(
        runtime, prompt.label, steps, True, float(diff.max()), bound,
        reference_tokens=free.tokens.tolist(), candidate_tokens=got.tokens.tolist(),
    )  # fmt: skip
    if (diff > bound).any():
        step, row = (int(i) for i in np.argwhere(diff > bound)[0])
        where = first_diverging_unit(got.step_taps[step], replayed.taps[step], units, tol)
        problems.append(
            (step, row, f"logits differ by {float(diff[step, row]):.3g} > {bound:.3g} under replay; {where}")
        )
    for row in range(got.tokens.shape[0]):
        problems += _row_problems(row, got, free, replayed, flips, bound, result.near_ties)
    if problems:
        problems.sort(key=lambda p: p[0])
        result.passed = False
        result.first_bad_step, result.first_bad_row, reason = problems[0]
        also = "".join(f"; also step {p[0]}: {p[2]}" for p in problems[1:3])
        result.message = f"{prompt.label}: first bad step {problems[0][0]} (row {problems[0][1]}): {reason}{also}"
    return result


def _row_problems(
    row: int, got: DecodeResult, free: Decoded, replayed: Decoded, flips: list[Flip], bound: float, near_ties: list[str]
) -> list[tuple[int, int, str]]:
    """The token checks of one row: replayed argmax vs the candidate's token, and where it leaves the free run."""
    problems = []
    for step in range(got.tokens.shape[1]):
        want, token = int(replayed.logits[step, row].argmax()), int(got.tokens[row, step])
        gap = float(replayed.logits[step, row, want] - replayed.logits[step, row, token])
        if gap > bound:
            problems.append(
                (
                    step,
                    row,
                    f"row {row} step {step}: token {token} where the replayed reference picks {want} (logit gap {gap:.3g} > {bound:.3g})",
                )
            )
    apart = np.flatnonzero(free.tokens[row] != got.tokens[row])
    if not apart.size:
        return problems
    step = int(apart[0])
    want, token = int(free.tokens[row, step]), int(got.tokens[row, step])
    row_flips = [f for f in flips if f.row == row and _step_of(f) <= step]
    gap = float(free.logits[step, row, want] - free.logits[step, row, token])
    if row_flips and all(f.near_tie for f in row_flips):
        f = max(row_flips, key=lambda f: f.margin)
        near_ties.append(
            f"row {row} diverges at step {step} after {len(row_flips)} near-tie flip(s), e.g. step {_step_of(f)} unit {f.unit} margin {f.margin:.3g} <= {f.bound:.3g}"
        )
    elif gap <= bound:
        near_ties.append(
            f"row {row} diverges at step {step} at a logits near-tie (reference margin {gap:.3g} <= {bound:.3g})"
        )
    else:
        problems.append(
            (
                step,
                row,
                f"row {row} leaves the reference at step {step} (token {token} instead of {want}, reference margin {gap:.3g}) without a near-tie",
            )
        )
    return problems


def _step_of(flip: Flip) -> int:
    return int(flip.input.rsplit(" step ", 1)[1])
