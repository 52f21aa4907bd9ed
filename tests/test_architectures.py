"""Bases beyond Llama (issue 11): tiny Mistral and Qwen2 samples through load, merge and the plain-transformers
reload; unsupported architectures refused at load. The ONNX + validate path of their checkpoints
(samples/goat_mistral, samples/mixlora_qwen2) runs in tests/test_onnx_export.py's sample table, and their
reference forward against the loop oracle in tests/test_formats.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from typer.testing import CliRunner

import moe_export
from moe_export.cli import app
from moe_export.formats.checkpoint import read_tensor_file
from moe_export.merging import merge
from moe_export.reference.architectures import SUPPORTED
from tests.conftest import SAMPLES

runner = CliRunner()


def _hf(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_sample_bases_are_what_they_claim() -> None:
    mistral, qwen2 = _hf(SAMPLES / "tiny-mistral"), _hf(SAMPLES / "tiny-qwen2")
    # Mistral 7B v0.1's sliding window, shorter than the tests' prompts (tests/test_real_configs.py generates with it)
    assert type(mistral).__name__ == "MistralForCausalLM" and mistral.config.sliding_window == 16
    assert type(qwen2).__name__ == "Qwen2ForCausalLM"
    attn = qwen2.model.layers[0].self_attn
    assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj")) and attn.o_proj.bias is None
    assert (
        qwen2.config.tie_word_embeddings
        and qwen2.lm_head.weight.data_ptr() == qwen2.model.embed_tokens.weight.data_ptr()
    )
    with safe_open(str(SAMPLES / "tiny-qwen2" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied: stored once, as the embedding


def test_unsupported_architecture_is_refused_at_load(tmp_path: Path) -> None:
    base = tmp_path / "gpt2-like"
    shutil.copytree(SAMPLES / "tiny-mistral", base)
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    for args in (["inspect", str(SAMPLES / "goat_mistral")], ["onnx", str(SAMPLES / "goat_mistral"), "-o", str(out)]):
        result = runner.invoke(app, [*args, "--base", str(base)])
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and "GPT2LMHeadModel" in line and str(base / "config.json") in line
        assert all(cls in line for cls in SUPPORTED.values()), line
    assert not out.exists()


def test_qwen2_merge_with_tied_embeddings_loads_in_plain_transformers(tmp_path: Path) -> None:
    """MixLoRA on Qwen2: the attention LoRAs fold exactly into the biased q/k/v/o; the merged directory
    loads in plain transformers with lm_head still tied, and with OUT/adapter it is the unmerged model."""
    sample, out = SAMPLES / "mixlora_qwen2", tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(sample), "--merge-threshold", "0.9", "--samples", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    plain, base = _hf(out), _hf(SAMPLES / "tiny-qwen2")
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    assert torch.equal(plain.lm_head.weight, base.lm_head.weight)
    # Independent of our loader: W + (alpha / r) B A from the raw MoE-PEFT keys; biases untouched.
    raw = read_tensor_file(sample / "adapter_model.bin")
    config = json.loads((sample / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"mixlora.layers.{layer}.self_attn.{proj}"
            a, b = raw[f"{key}.lora_A.weight"].detach().double(), raw[f"{key}.lora_B.weight"].detach().double()
            got = getattr(plain.model.layers[layer].self_attn, proj)
            want = getattr(base.model.layers[layer].self_attn, proj)
            torch.testing.assert_close(got.weight.double(), want.weight.double() + scaling * b @ a, rtol=0, atol=1e-6)
            assert (got.bias is None and want.bias is None) or torch.equal(got.bias, want.bias)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    unmerged = moe_export.load(sample)
    pair = moe_export.load(out / "adapter")  # the routed MLP blocks over the merged base
    torch.testing.assert_close(_logits(pair.model, ids), _logits(unmerged.model, ids), rtol=1e-5, atol=1e-5)


def test_mistral_goat_merge_matches_in_memory_merge(tmp_path: Path) -> None:
    sample, out = SAMPLES / "goat_mistral", tmp_path / "merged"
    args = ["merge", str(sample), "--merge-threshold", "0.9", "--samples", "4", "--seq-len", "16", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    in_memory = merge(moe_export.load(sample), threshold=0.9, samples=4, seq_len=16, progress=False).loaded
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(6))
    want = _logits(in_memory.model, ids)
    got = _logits(moe_export.load(out / "adapter").model, ids) if (out / "adapter").is_dir() else _logits(_hf(out), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert type(_hf(out)).__name__ == "MistralForCausalLM"
