"""Generation parity of a KV-cache decoder export: greedy tokens and per-step logits vs the torch reference.

The reference is transformers' own `generate` (greedy, with its KV cache) on the faithful PyTorch model
(for right-padded prompts an explicit-cache loop on the same model, see `torch_reference`);
the candidate is any Runner of the export driven by `greedy_decode`, a plain loop over the decoder I/O
contract (first step with past length 0, then one token per step feeding the presents back). Both follow
the same right-padding rule as onnxruntime-genai: the first token comes from each row's last real token,
new tokens are appended after the padding, attention_mask marks the pads 0 and positions count attended
tokens (export/interface.py), so every row of a padded batch generates what it would alone.

A token mismatch is a **near-tie** when the reference's logits of its own token and of the candidate's
token differ by no more than the logits tolerance: numerically equal choices, reported, not failed; that
row is not compared further (its prefix differs from then on). Any other mismatch, or a step whose logits
exceed the tolerance, fails and names the first bad step and row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import MoeExportError
from moe_export.export.client_files import GENAI_CONFIG
from moe_export.export.decoder import cache_argument, returned_cache
from moe_export.export.interface import position_ids
from moe_export.runtimes.base import Feeds, Runner
from moe_export.validation.parity import Tolerance

DEFAULT_NEW_TOKENS = 16
PROMPT_LENGTH = 7
PADDED_LENGTHS = (7, 4, 5)  # a right-padded batch: rows shorter than the longest are padded on the right


@dataclass
class Prompts:
    """Token ids [B, S] with their attention mask (0 on right padding)."""

    label: str
    input_ids: np.ndarray
    attention_mask: np.ndarray


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


def next_token_logits(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, S, V] -> [B, V] at each row's last attended position (a right-padded prompt ends before its pads)."""
    width = logits.shape[1]
    last = mask[:, -width:].shape[1] - 1 - np.argmax(mask[:, -width:][:, ::-1] != 0, axis=1)
    return logits[np.arange(logits.shape[0]), last]


def _all_stopped(tokens: list[np.ndarray], stop_ids: set[int]) -> bool:
    emitted = np.stack(tokens, axis=1)
    return bool(np.isin(emitted, list(stop_ids)).any(axis=1).all())


StepLogits = Callable[[np.ndarray, int, np.ndarray | None], np.ndarray]


def _greedy_loop(
    step: StepLogits,
    mask: np.ndarray,
    new_tokens: int,
    stop_ids: set[int] | None,
    advance: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The greedy loop of both decoders: tokens [B, N] and logits [N, B, V].

    `step(mask, past, token)` runs one decoder step and returns its next-token logits [B, V]; `token` is None
    on the first step (the prompt, past length 0), then the previous step's tokens [B] with the mask grown by
    one column and `past` the attended length before it.
    """
    tokens, logits = [], []
    past, token = 0, None
    for _ in range(new_tokens):
        logits.append(step(mask, past, token))
        token = logits[-1].argmax(-1).astype(np.int64)
        tokens.append(token)
        if advance is not None:
            advance()
        if stop_ids and _all_stopped(tokens, stop_ids):
            break
        past = mask.shape[1]
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
    return np.stack(tokens, axis=1), np.stack(logits)


@dataclass
class Decoded:
    """Greedy tokens [B, N] and the logits each step chose from, [N, B, V] (fp32)."""

    tokens: np.ndarray
    logits: np.ndarray
    feeds: list[Feeds] = field(default_factory=list)  # each step's feeds, when asked for (keep_feeds)


def greedy_decode(
    runner: Runner,
    manifest: Any,
    prompts: Prompts,
    new_tokens: int,
    stop_ids: set[int] | None = None,
    keep_feeds: bool = False,
    advance: Callable[[], None] | None = None,
) -> Decoded:
    """Greedy decoding through the export's decoder interface; `runner` must be active.

    With `stop_ids`, decoding ends once every row has produced one of them (later tokens of a finished
    row are still decoded, as a batch must be, and are the caller's to drop).
    """
    interface = manifest.interface
    kept: list[Feeds] = []
    out: dict[str, Any] = {}

    def step(mask: np.ndarray, past: int, token: np.ndarray | None) -> np.ndarray:
        nonlocal out
        if token is None:
            first = {interface.tokens_name: prompts.input_ids.astype(np.int64), interface.mask_name: mask}
            feeds = interface.complete_feeds(first)
        else:
            feeds = interface.next_step_feeds(token, mask, past, out)
        if keep_feeds:
            kept.append(feeds)
        out = runner.infer(feeds)
        return next_token_logits(np.asarray(out[interface.logits_name]), mask).astype(np.float32)

    tokens, logits = _greedy_loop(step, prompts.attention_mask.astype(np.int64), new_tokens, stop_ids, advance)
    return Decoded(tokens, logits, kept)


def torch_reference(model: Any, prompts: Prompts, new_tokens: int, pad_id: int) -> Decoded:
    """The reference tokens: `generate` for unpadded prompts, the explicit-cache loop for padded ones.

    transformers' `generate` takes a right-padded row's first token from the last (pad) column and
    positions its new tokens by column; onnxruntime-genai continues each row from its last real token,
    so a padded row generates what it would alone. The loop below follows genai, on the same model with
    the same DynamicCache `generate` uses.
    """
    if prompts.attention_mask.all():
        return torch_generate(model, prompts, new_tokens, pad_id)
    return torch_greedy(model, prompts, new_tokens)


def torch_greedy(
    model: Any,
    prompts: Prompts,
    new_tokens: int,
    stop_ids: set[int] | None = None,
    advance: Callable[[], None] | None = None,
) -> Decoded:
    """Greedy decoding on the PyTorch model with its own KV cache, positions from the mask (export/interface.py)."""
    import torch

    cache = None

    def step(mask: np.ndarray, past: int, token: np.ndarray | None) -> np.ndarray:
        nonlocal cache
        ids = prompts.input_ids.astype(np.int64) if token is None else token[:, None]
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(position_ids(mask, past)),
            use_cache=True,
            **{cache_argument(model): cache},
        )
        cache = returned_cache(out)
        return next_token_logits(out.logits.float().numpy(), mask)

    with torch.no_grad():
        tokens, logits = _greedy_loop(step, prompts.attention_mask.astype(np.int64), new_tokens, stop_ids, advance)
    return Decoded(tokens, logits)


def torch_generate(model: Any, prompts: Prompts, new_tokens: int, pad_id: int) -> Decoded:
    """transformers `generate`, greedy with its cache, exactly `new_tokens` steps (EOS does not stop it)."""
    import torch
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=0,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=None,  # a fixed number of steps: both sides are compared on every one
        pad_token_id=pad_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # An unset eos in the passed config falls back to the model's own: clear that too, for fixed-length runs.
    defaults = getattr(model, "generation_config", None)
    saved_eos = getattr(defaults, "eos_token_id", None)
    if defaults is not None:
        defaults.eos_token_id = None
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.from_numpy(prompts.input_ids),
                attention_mask=torch.from_numpy(prompts.attention_mask),
                generation_config=config,
            )
    finally:
        hf_logging.set_verbosity(verbosity)
        if defaults is not None:
            defaults.eos_token_id = saved_eos
    width = prompts.input_ids.shape[1]
    if out.sequences.shape[1] != width + new_tokens:
        raise MoeExportError(f"torch generate stopped after {out.sequences.shape[1] - width} of {new_tokens} tokens")
    logits = np.stack([step.float().numpy() for step in out.logits])
    return Decoded(out.sequences[:, width:].numpy().astype(np.int64), logits)


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


def pad_token_id(export_dir: Path) -> int:
    """The pad id onnxruntime-genai uses for this export (genai_config.json), 0 (genai's default) without one."""
    path = export_dir / GENAI_CONFIG
    try:
        return int(json.loads(path.read_text())["model"]["pad_token_id"])
    except (OSError, KeyError, TypeError, ValueError):
        return 0
