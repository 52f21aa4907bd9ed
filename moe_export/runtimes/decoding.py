"""Greedy decoding through an export's decoder interface and on the PyTorch reference, for `generate` and validation.

The candidate is any Runner of the export driven by `greedy_decode`, a plain loop over the decoder I/O
contract (first step with past length 0, then one token per step feeding the presents back). The reference is
transformers' own `generate` (greedy, with its KV cache) on the faithful PyTorch model (for right-padded prompts
an explicit-cache loop on the same model, see `torch_reference`). Both follow the same right-padding rule as
onnxruntime-genai: the first token comes from each row's last real token, new tokens are appended after the
padding, attention_mask marks the pads 0 and positions count attended tokens (export/interface.py), so every row of
a padded batch generates what it would alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import MoeExportError
from moe_export.export.client_files import read_genai_model
from moe_export.export.decoder import cache_argument, returned_cache
from moe_export.export.interface import position_ids
from moe_export.reference.model import force_routing
from moe_export.reference.routing import ForcedRoute
from moe_export.runtimes.base import Feeds, Runner
from moe_export.runtimes.taps import UnitCapture, record_torch_routing


@dataclass
class Prompts:
    """Token ids [B, S] with their attention mask (0 on right padding)."""

    label: str
    input_ids: np.ndarray
    attention_mask: np.ndarray


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
    forced_tokens: np.ndarray | None = None,
    advance: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The greedy loop of both decoders: tokens [B, N] and logits [N, B, V].

    `step(mask, past, token)` runs one decoder step and returns its next-token logits [B, V]; `token` is None
    on the first step (the prompt, past length 0), then the previous step's tokens [B] with the mask grown by
    one column and `past` the attended length before it. `forced_tokens` [B, N] replaces the argmax (teacher
    forcing: the reference replays a candidate's tokens).
    """
    tokens, logits = [], []
    past, token = 0, None
    for index in range(new_tokens):
        logits.append(step(mask, past, token))
        token = logits[-1].argmax(-1).astype(np.int64) if forced_tokens is None else forced_tokens[:, index]
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
    taps: list[dict[str, UnitCapture]] = field(default_factory=list)  # each step's unit taps, when the runner taps


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
    taps: list[dict[str, UnitCapture]] = []
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
        if runner.taps_requested:
            taps.append(dict(runner.last_taps))
        return next_token_logits(np.asarray(out[interface.logits_name]), mask).astype(np.float32)

    mask = prompts.attention_mask.astype(np.int64)
    tokens, logits = _greedy_loop(step, mask, new_tokens, stop_ids, advance=advance)
    return Decoded(tokens, logits, kept, taps)


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
    forced_tokens: np.ndarray | None = None,
    routes: list[dict[str, ForcedRoute]] | None = None,
) -> Decoded:
    """Greedy decoding on the PyTorch model with its own KV cache, positions from the mask (export/interface.py).

    Route replay: `forced_tokens` [B, N] are fed instead of the argmax and `routes` (one per step) force each
    step's routing decisions; each step's own decisions are then tapped into `Decoded.taps`."""
    import torch

    cache = None
    taps: list[dict[str, UnitCapture]] = []

    def step(mask: np.ndarray, past: int, token: np.ndarray | None) -> np.ndarray:
        nonlocal cache
        ids = prompts.input_ids.astype(np.int64) if token is None else token[:, None]
        with contextlib.ExitStack() as stack:
            if routes is not None:
                stack.enter_context(force_routing(model, routes[len(taps)]))
                taps.append(stack.enter_context(record_torch_routing(model)))
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
        mask = prompts.attention_mask.astype(np.int64)
        tokens, logits = _greedy_loop(step, mask, new_tokens, stop_ids, forced_tokens, advance)
    return Decoded(tokens, logits, taps=taps)


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


def pad_token_id(export_dir: Path) -> int:
    """The pad id onnxruntime-genai uses for this export (genai_config.json), 0 (genai's default) without one."""
    try:
        return int(read_genai_model(export_dir)["pad_token_id"])
    except (KeyError, TypeError, ValueError):
        return 0
