"""Greedy generation in onnxruntime-genai from token ids (no tokenizer), checked against the torch reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_export.runtimes.decoding import Prompts, torch_reference


def genai_greedy(export_dir: Path, input_ids: np.ndarray, new_tokens: int) -> list[list[int]]:
    """New tokens per row; a row stops early only at an EOS (genai's own rule), which it then ends with."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(export_dir))
    params = og.GeneratorParams(model)
    batch, width = input_ids.shape
    params.set_search_options(max_length=width + new_tokens, do_sample=False, batch_size=batch)
    generator = og.Generator(model, params)
    generator.append_tokens(input_ids.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(row)[width:]] for row in range(batch)]


def assert_genai_matches_torch(
    export_dir: Path, model: torch.nn.Module, prompts: Prompts, new_tokens: int = 12
) -> None:
    """genai's tokens equal the reference's, row by row; a row genai ended early must end with an EOS."""
    config = json.loads((export_dir / "genai_config.json").read_text())["model"]
    eos = config["eos_token_id"]
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    want = torch_reference(model, prompts, new_tokens, config["pad_token_id"]).tokens.tolist()
    got = genai_greedy(export_dir, prompts.input_ids, new_tokens)
    for row, (g, w) in enumerate(zip(got, want, strict=True)):
        end = next((i + 1 for i, t in enumerate(g) if t in eos_ids), len(g))
        g = g[:end]  # finished rows are padded after their EOS
        assert g == w[: len(g)], f"row {row}: genai {g} vs torch {w}"
        assert len(g) == new_tokens or g[-1] in eos_ids, f"row {row}: genai stopped early without EOS: {g}"
