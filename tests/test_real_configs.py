"""Real config features of the bases in the KV-cache decoder (issue 24): Mistral's sliding window, Qwen2's
per-layer sliding window (use_sliding_window / max_window_layers) and Llama 3's `llama3` rope scaling.

The samples carry them the way the hub's config.json files spell them (samples/make_samples.py): window 16,
shorter than the 40-token prompt here, so positions beyond it are masked on every step. A 40-token prompt
then generates the reference's tokens in onnxruntime-genai (optimum: benchmarks/optimum_check.sh, run by
.ci/run), and ONNX Runtime's per-step logits match the reference's. Each feature is shown to matter on that
prompt: the same checkpoint over a copy of its base with the feature switched off moves the prompt step's logits
far beyond that tolerance, so matching logits prove the graph carries the feature.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import moe_export
from moe_export.export.manifest import Artifact, ExportManifest
from moe_export.runtimes.decoding import Prompts, greedy_decode, torch_reference
from moe_export.runtimes.registry import make_runner
from tests.artifacts import sample_export
from tests.conftest import SAMPLES
from tests.genai_check import assert_genai_matches_torch, genai_greedy

PROMPT_LENGTH, NEW_TOKENS, WINDOW = 40, 12, 16
# fp32 graph vs fp32 torch on logits of size ~1-10: reordered sums, measured max ~2e-6 (validate's own gate is 1e-4 relative).
LOGITS_ATOL = 1e-4
# sample -> (base, the config.json keys that switch the feature off)
CASES: dict[str, tuple[str, dict[str, object]]] = {
    "goat_mistral": ("tiny-mistral", {"sliding_window": None}),
    "mixlora_qwen2": ("tiny-qwen2", {"use_sliding_window": False}),
    "moe_peft_mola_llama3": ("tiny-llama3", {"rope_scaling": None}),
}


def _prompt() -> Prompts:
    ids = np.random.default_rng(24).integers(4, 256, size=(1, PROMPT_LENGTH), dtype=np.int64)
    return Prompts(f"1x{PROMPT_LENGTH}", ids, np.ones_like(ids))


def _pad_id(base: str) -> int:
    return int(json.loads((SAMPLES / base / "config.json").read_text())["pad_token_id"])


def test_sample_bases_carry_the_real_features() -> None:
    from transformers import AutoConfig

    mistral = AutoConfig.from_pretrained(str(SAMPLES / "tiny-mistral"))
    qwen2 = AutoConfig.from_pretrained(str(SAMPLES / "tiny-qwen2"))
    llama3 = AutoConfig.from_pretrained(str(SAMPLES / "tiny-llama3"))
    assert mistral.sliding_window == WINDOW < PROMPT_LENGTH
    assert qwen2.use_sliding_window and qwen2.sliding_window == WINDOW and qwen2.max_window_layers == 1
    assert qwen2.layer_types == ["full_attention", "sliding_attention"]  # derived, as from a hub config
    assert llama3.rope_parameters["rope_type"] == "llama3" and llama3.rope_parameters["factor"] == 8.0


def test_window_masks_exactly_the_positions_beyond_it(tmp_path: Path) -> None:
    """transformers' own semantics, which the decoder must reproduce: with the window, the first WINDOW
    positions see everything before them (same logits as full attention), every later one does not."""
    ids = torch.from_numpy(_prompt().input_ids)
    windowed = moe_export.load(SAMPLES / "goat_mistral").model
    full = moe_export.load(SAMPLES / "goat_mistral", base_model=_feature_off(tmp_path, "goat_mistral")).model
    with torch.no_grad():
        a, b = windowed(input_ids=ids).logits[0], full(input_ids=ids).logits[0]
    torch.testing.assert_close(a[:WINDOW], b[:WINDOW], rtol=1e-5, atol=1e-5)
    assert ((a[WINDOW:] - b[WINDOW:]).abs().amax(-1) > 1e-3).all()


@pytest.mark.parametrize("sample", sorted(CASES))
def test_genai_generates_the_reference_tokens(
    sample: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base, _ = CASES[sample]
    export = sample_export(tmp_path_factory, SAMPLES / sample).out_dir
    genai = json.loads((export / "genai_config.json").read_text())
    # genai's decoder.sliding_window means a fixed-size windowed KV cache it slides itself; this graph takes the
    # whole past and masks in the graph, so the key must stay out.
    assert "sliding_window" not in genai["model"]["decoder"]
    past = onnx.load(str(export / "model.onnx"), load_external_data=False).graph.input[3]
    assert past.type.tensor_type.shape.dim[2].dim_param, "past length must stay symbolic (not bounded by a window)"

    prompts = _prompt()
    model = moe_export.load(SAMPLES / sample).model
    want = torch_reference(model, prompts, NEW_TOKENS, _pad_id(base))
    with make_runner("onnxruntime", Artifact.open(export)) as runner:
        got = greedy_decode(runner, ExportManifest.load(export), prompts, NEW_TOKENS)
    assert got.tokens.tolist() == want.tokens.tolist()
    error = float(np.abs(got.logits - want.logits).max())
    assert error <= LOGITS_ATOL, f"{sample}: decode-step logits differ by {error:.3g}"
    # The prompt step's logits (the last prompt position, beyond the window) without the feature: far off.
    without = moe_export.load(SAMPLES / sample, base_model=_feature_off(tmp_path, sample)).model
    gap = float(np.abs(torch_reference(without, prompts, 1, _pad_id(base)).logits[0] - want.logits[0]).max())
    assert gap > 100 * LOGITS_ATOL, f"{sample}: the feature moves the logits by only {gap:.3g}; the test could not tell"
    assert_genai_matches_torch(export, model, prompts, new_tokens=NEW_TOKENS)
    assert genai_greedy(export, prompts.input_ids, NEW_TOKENS) == want.tokens.tolist()  # all 12: no early EOS


def _feature_off(tmp_path: Path, sample: str) -> Path:
    base, off = CASES[sample]
    copy = tmp_path / f"{base}-off"
    shutil.copytree(SAMPLES / base, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(off)
    (copy / "config.json").write_text(json.dumps(config))
    return copy
