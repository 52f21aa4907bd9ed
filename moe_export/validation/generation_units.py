"""Which routed unit a generation failure shows up in first: both sides re-run the failing step on the same tokens.

The candidate's tokens up to the bad step are fed to both sides (forced decoding), each with its own cache
(the reference its DynamicCache, the export its own presents), so a broken KV path surfaces where it
first changes what a unit sees. Units are visited in the reference's execution order; the first whose
input (for the failing row's tokens) is off by more than the tolerance, or that picks other experts, is
named. When every unit agrees, the divergence lies after the last unit or outside the adapter's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moe_export.export.decoder import cache_argument, returned_cache
from moe_export.export.interface import position_ids
from moe_export.runtimes.base import Feeds, Runner
from moe_export.validation.generation import (
    DEFAULT_NEW_TOKENS,
    GenerationComparison,
    Prompts,
    compare_generation,
    default_prompts,
    greedy_decode,
    torch_reference,
)
from moe_export.validation.parity import Tolerance
from moe_export.validation.routing_capture import UnitCapture, match_unit, record_torch_routing, run_onnxruntime_debug


def reference_step_captures(model: Any, prompts: Prompts, forced: np.ndarray, step: int) -> dict[str, UnitCapture]:
    """Routing captures of the reference at decode step `step`, fed the tokens `forced[:, :step]`."""
    import torch

    mask = prompts.attention_mask.astype(np.int64)
    ids, cache, past = prompts.input_ids.astype(np.int64), None, 0
    with torch.no_grad():
        for index in range(step + 1):
            kwargs = dict(  # transformers' forward arguments (not graph names)
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(position_ids(mask, past)),
                use_cache=True,
                **{cache_argument(model): cache},
            )
            if index == step:
                with record_torch_routing(model) as captured:
                    model(**kwargs)
                return captured
            cache = returned_cache(model(**kwargs))
            past = mask.shape[1]
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
            ids = forced[:, index : index + 1].astype(np.int64)
    return {}


def row_tokens(step: int, row: int, batch: int, width: int) -> slice:
    """The flattened [B*S] token indices of one row at a step (S = width on the first step, else 1)."""
    if step == 0:
        return slice(row * width, (row + 1) * width)
    return slice(row, row + 1)


def first_diverging_unit(
    reference_model: Any,
    onnx_path: Path,
    prompts: Prompts,
    step_feeds: Feeds,
    forced: np.ndarray,
    step: int,
    row: int,
    tol: Tolerance,
) -> str:
    """A sentence naming the first unit whose input or routing differs at the failing step and row."""
    ref = reference_step_captures(reference_model, prompts, forced, step)
    (cand,) = run_onnxruntime_debug(onnx_path, [step_feeds])
    by_unit = {match_unit(node, set(ref)) or node: capture for node, capture in cand.items()}
    tokens = row_tokens(step, row, prompts.input_ids.shape[0], prompts.input_ids.shape[1])
    for unit, want in ref.items():  # execution order
        got = by_unit.get(unit)
        if got is None:
            continue
        if want.x is not None and got.x is not None:
            a, b = want.x[tokens].astype(np.float32), got.x[tokens].astype(np.float32)
            diff = float(np.abs(a - b).max()) if a.size else 0.0
            if diff > tol.bound(float(np.abs(a).max()) if a.size else 0.0):
                return f"first diverging unit {unit} (its input differs by {diff:.3g})"
        if not np.array_equal(np.sort(want.expert_ids[tokens], -1), np.sort(got.expert_ids[tokens], -1)):
            return f"first diverging unit {unit} (other experts selected)"
    return "every routed unit sees the same input and routes alike: the divergence is after them or off their path"


def check_generation(
    reference_model: Any,
    candidates: dict[str, Runner],
    manifest: Any,
    tol: Tolerance,
    vocab: int,
    pad_id: int,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    seed: int = 0,
    onnx_path: Path | None = None,
) -> list[GenerationComparison]:
    """Every candidate runner (inactive; activated here) on the default prompts against `generate`.

    With `onnx_path`, a failing onnxruntime comparison also names its first diverging unit.
    """
    prompts = default_prompts(vocab, pad_id, seed)
    expected = [torch_reference(reference_model, p, new_tokens, pad_id) for p in prompts]
    results = []
    for name, runner in candidates.items():
        with runner:
            for prompt, ref in zip(prompts, expected, strict=True):
                got = greedy_decode(runner, manifest, prompt, new_tokens, keep_feeds=onnx_path is not None)
                result = compare_generation(name, prompt.label, ref, got, tol)
                if not result.passed and onnx_path is not None and name == "onnxruntime":
                    step, row = result.first_bad_step or 0, result.first_bad_row or 0
                    where = first_diverging_unit(
                        reference_model, onnx_path, prompt, got.feeds[step], got.tokens, step, row, tol
                    )
                    result.message += f"; {where}"
                results.append(result)
    return results
