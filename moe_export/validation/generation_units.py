"""Generation parity under route replay: the candidate decodes greedily (tapping its units at every step), then the
reference replays the candidate's tokens and routing.

The reference runs without a KV cache, teacher-forced: the prompt followed by the candidate's tokens is one
forward (causal: position p sees only the tokens up to p), so every step's logits and taps come from one pass over
the weights, which a layer-streamed reference (validation/reference_run.py) can afford where a step-by-step loop
would reload the model per token. Right-padded rows follow the decoder rule (runtimes/decoding.py): new tokens
after the pads, the mask 0 on the pads, positions counting attended tokens (export/interface.py position_ids).
- Logits: every step's next-token logits against the replayed reference's, on every row (the replay keeps both
  on the candidate's prefix, so no row drops out after a divergence).
- Routing: every step's flips are judged like the scoring flips (validation/units.py); one above its bound fails.
- Tokens: the candidate's greedy token must be the replayed reference's argmax up to a logits near-tie.
- Divergence from the free-running reference (its own routing and its own greedy tokens): up to a row's first
  divergence the free run is the teacher-forced run with the reference's own routing (same prefix); after it the
  free run continues one recomputed forward per step, only when some row diverged. A divergence is accepted
  only where it starts at a near-tie, i.e. a routing flip within its bound on that row at or before the step, or
  a reference logit gap between the two tokens within the logits bound; it is reported as (step, row, unit,
  margin). Any other divergence fails.
Without taps (a runtime that cannot tap, or a reference that cannot replay) the free-running comparison alone
decides. Legend: B batch, W prompt width, N steps, S = W + N - 1, V vocabulary, K slots.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moe_export.export.interface import GraphInterface
from moe_export.reference.model import ReferenceUnit
from moe_export.reference.routing import ForcedRoute
from moe_export.runtimes.base import Feeds, Runner
from moe_export.runtimes.decoding import Decoded, Prompts, greedy_decode, next_token_logits
from moe_export.runtimes.taps import UnitCapture
from moe_export.validation.generation import GenerationComparison, compare_generation
from moe_export.validation.parity import Tolerance
from moe_export.validation.reference_run import Job, Reference
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


def forced_feeds(prompt: Prompts, tokens: np.ndarray, interface: GraphInterface) -> Feeds:
    """The prompt followed by `tokens` [B, n] but the last: one forward gives the logits of all n steps."""
    ids = np.concatenate([prompt.input_ids, tokens[:, :-1]], axis=1).astype(np.int64)
    mask = np.concatenate([prompt.attention_mask, np.ones_like(tokens[:, :-1])], axis=1).astype(np.int64)
    return interface.complete_feeds({interface.tokens_name: ids, interface.mask_name: mask})


def step_rows(prompt: Prompts, steps: int) -> list[np.ndarray]:
    """The flat token rows (b * S + s) each decode step covers in the teacher-forced sequence: the prompt, then one
    column per step (the tokens a KV decoder feeds step by step)."""
    batch, width = prompt.input_ids.shape
    seq = width + steps - 1
    rows = [(np.arange(batch)[:, None] * seq + np.arange(width)[None, :]).reshape(-1)]
    return rows + [np.arange(batch) * seq + width + t - 1 for t in range(1, steps)]


def step_logits(logits: np.ndarray, prompt: Prompts, steps: int) -> np.ndarray:
    """Teacher-forced logits [B, S, V] -> each step's next-token logits [N, B, V] (fp32)."""
    width = prompt.input_ids.shape[1]
    first = next_token_logits(logits[:, :width], prompt.attention_mask)
    return np.stack([first, *(logits[:, width + t - 1] for t in range(1, steps))]).astype(np.float32)


def joined_routes(step_routes: list[dict[str, ForcedRoute]], batch: int) -> dict[str, ForcedRoute]:
    """Per-step forced routes (step 0: [B*W, K], then [B, K]) -> one route over the teacher-forced rows [B*S, K]."""
    import torch

    joined = {}
    for unit in step_routes[0]:
        parts = [r[unit] for r in step_routes if unit in r]
        if len(parts) != len(step_routes):
            continue  # not every step tapped this unit: it routes on its own
        slots = parts[0].expert_ids.shape[1]
        ids = torch.cat([p.expert_ids.reshape(batch, -1, slots) for p in parts], dim=1).reshape(-1, slots)
        kept = torch.cat([p.kept.reshape(batch, -1, slots) for p in parts], dim=1).reshape(-1, slots)
        joined[unit] = ForcedRoute(ids, kept)
    return joined


def split_taps(taps: dict[str, UnitCapture], rows: list[np.ndarray]) -> list[dict[str, UnitCapture]]:
    """Teacher-forced taps (rows [B*S]) -> each step's taps, as the step-by-step decoder would have them."""
    steps = []
    for step in rows:
        steps.append(
            {
                name: replace(c, **{k: v[step] for k, v in c.arrays().items()})  # every field has T rows
                for name, c in taps.items()
            }
        )
    return steps


@dataclass
class GenerationJobs:
    """The reference jobs of one candidate's decode of one prompt batch: replayed (None without taps) and own."""

    prompt: Prompts
    got: DecodeResult
    replay: Job | None
    own: Job


def generation_jobs(
    decoded: list[DecodeResult], prompts: list[Prompts], units: dict[str, ReferenceUnit], interface: GraphInterface
) -> list[GenerationJobs]:
    """The teacher-forced reference jobs of a candidate's decodes: its routing replayed (when it tapped every step
    and the reference can replay), and the reference's own routing (the free run up to the first divergence)."""
    out = []
    for prompt, got in zip(prompts, decoded, strict=True):
        feeds = forced_feeds(prompt, got.tokens, interface)
        steps = got.tokens.shape[1]
        replay = None
        if units and len(got.step_taps) == steps:
            routes = joined_routes([forced_routes(taps, units) for taps in got.step_taps], prompt.input_ids.shape[0])
            replay = Job(feeds, routes)
        out.append(GenerationJobs(prompt, got, replay, Job(feeds)))
    return out


def free_running(reference: Reference, prompt: Prompts, own: np.ndarray, got: np.ndarray, logits_name: str,
                 interface: GraphInterface) -> Decoded:  # fmt: skip
    """The reference's own greedy decode, from its teacher-forced logits on the candidate's prefix `own` [N, B, V]:
    exact up to each row's first divergence; after the earliest one, one recomputed forward per step."""
    tokens, logits = own.argmax(-1).T.astype(np.int64), own.copy()  # [B, N], [N, B, V]
    steps, width = got.shape[1], prompt.input_ids.shape[1]
    apart = tokens != got
    first = np.where(apart.any(1), apart.argmax(1), steps)  # [B]: each row's first divergence
    for t in range(int(first.min()) + 1, steps):
        # Rows still on the candidate's prefix have tokens[:, :t] == got[:, :t]; the others their own tokens.
        fed = np.concatenate([tokens[:, :t], tokens[:, :1]], axis=1)  # forced_feeds does not feed the last column
        ran = reference.run([Job(forced_feeds(prompt, fed, interface))])
        step = np.asarray(ran[0].outputs[logits_name])[:, width + t - 1].astype(np.float32)  # [B, V]
        behind = first < t  # rows already off the candidate's prefix continue on their own tokens
        logits[t, behind], tokens[behind, t] = step[behind], step[behind].argmax(-1)
    return Decoded(tokens, logits)


def check_generation(
    reference: Reference,
    runtime: str,
    jobs: list[GenerationJobs],
    replayed: list[Any],
    tol: Tolerance,
    interface: GraphInterface,
    export_dtype: str,
) -> list[GenerationComparison]:
    """One comparison per prompt batch of a candidate's decodes; `replayed` holds the reference's results of the
    jobs' replay (when any) and own runs, in order."""
    results, outputs = [], iter(replayed)
    name = interface.logits_name
    for job in jobs:
        prompt, got, steps = job.prompt, job.got, job.got.tokens.shape[1]
        replay = next(outputs) if job.replay is not None else None
        own = step_logits(np.asarray(next(outputs).outputs[name]), prompt, steps)
        free = free_running(reference, prompt, own, got.tokens, name, interface)
        candidate = Decoded(got.tokens, got.logits)
        if replay is None:
            results.append(compare_generation(runtime, prompt.label, free, candidate, tol))
            continue
        logits = step_logits(np.asarray(replay.outputs[name]), prompt, steps)
        replay_run = Decoded(got.tokens, logits, taps=split_taps(replay.taps, step_rows(prompt, steps)))
        results.append(_judge_replayed(runtime, prompt, got, free, replay_run, reference.units, export_dtype, tol))
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
