"""Whatever a training run saved, the canonical adapter holds inference tensors (issue 11, deliverable 1).

Each variant rewrites a committed sample the way some training code writes it (live parameters that
come back with requires_grad, views into one shared buffer, strided tensors, fp16/bf16 values) in
`.bin` or `.safetensors`. The adapter must come out detached, plain, contiguous, owning its storage,
in fp32 (the README's dtype policy), and the model must compute exactly what the saved values say:
layout variants give the very logits of the original sample; a half-precision variant gives the
logits of an fp32 file holding the same rounded values.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import moe_export
from moe_export.cli import app
from moe_export.formats.checkpoint import read_tensor_file
from moe_export.ir_tensors import adapter_tensors_are_inference_ready
from tests.conftest import SAMPLES

Tensors = dict[str, torch.Tensor]


def _as_parameters(tensors: Tensors) -> Tensors:
    return {k: torch.nn.Parameter(v.clone(), requires_grad=True) for k, v in tensors.items()}


def _as_views(tensors: Tensors) -> Tensors:
    """Every tensor a view into one flat buffer (torch.save keeps the sharing: one storage on load)."""
    flat = torch.cat([v.reshape(-1) for v in tensors.values()])
    out, start = {}, 0
    for k, v in tensors.items():
        out[k] = flat[start : start + v.numel()].view(v.shape)
        start += v.numel()
    return out


def _as_strided(tensors: Tensors) -> Tensors:
    return {k: v.T.contiguous().T if v.ndim == 2 else v for k, v in tensors.items()}


def _cast(dtype: torch.dtype) -> Callable[[Tensors], Tensors]:
    return lambda tensors: {k: v.to(dtype) for k, v in tensors.items()}


def _rounded(dtype: torch.dtype) -> Callable[[Tensors], Tensors]:
    """The same values as `_cast(dtype)`, stored in fp32: what the half-precision file means."""
    return lambda tensors: {k: v.to(dtype).float() for k, v in tensors.items()}


def _rewrite(
    tmp: Path, sample: str, name: str, transform: Callable[[Tensors], Tensors], base: Path | None = None
) -> Path:
    """A copy of samples/<sample> whose weights file holds `transform(original tensors)`."""
    out = tmp / name
    shutil.copytree(SAMPLES / sample, out)
    weights = next(p for p in out.iterdir() if p.name.startswith("adapter_model"))
    tensors = transform(read_tensor_file(weights))
    if weights.suffix == ".bin":
        torch.save(tensors, str(weights))
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights))
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base or (SAMPLES / "tiny-llama").resolve())
    config_path.write_text(json.dumps(config))
    return out


def _logits(loaded: moe_export.LoadedAdapter) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        return loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _assert_inference_ready(loaded: moe_export.LoadedAdapter) -> None:
    assert adapter_tensors_are_inference_ready(loaded.adapter) == []
    for name, buffer in loaded.model.named_buffers():
        assert not buffer.requires_grad and type(buffer) is torch.Tensor, name


# (sample, transform): .bin from a per-linear family, .safetensors from a PEFT-style one
LAYOUTS = {
    "bin-parameters": ("mola", _as_parameters),
    "bin-views": ("mola", _as_views),
    "bin-strided": ("mola", _as_strided),
    "safetensors-strided": ("moelora", _as_strided),
}
DTYPES = {
    "bin-bf16": ("mola", torch.bfloat16),
    "bin-fp16-parameters": ("moe_peft_mola", torch.float16),  # the sample already holds live parameters
    "safetensors-fp16": ("moelora", torch.float16),
}


@pytest.mark.parametrize("variant", sorted(LAYOUTS))
def test_layout_variants_give_the_same_model(tmp_path: Path, variant: str) -> None:
    sample, transform = LAYOUTS[variant]
    raw = read_tensor_file(
        _rewrite(tmp_path, sample, variant, transform)
        / next(p.name for p in (SAMPLES / sample).iterdir() if p.name.startswith("adapter_model"))
    )
    if variant == "bin-views":
        assert len({t.untyped_storage().data_ptr() for t in raw.values()}) == 1  # the file really shares one buffer
    loaded = moe_export.load(tmp_path / variant, top_k=2 if sample == "mola" else None)
    _assert_inference_ready(loaded)
    want = _logits(moe_export.load(SAMPLES / sample, top_k=2 if sample == "mola" else None))
    assert torch.equal(_logits(loaded), want)


@pytest.mark.parametrize("variant", sorted(DTYPES))
def test_half_precision_adapters_upcast_exactly(tmp_path: Path, variant: str) -> None:
    sample, dtype = DTYPES[variant]
    half = moe_export.load(_rewrite(tmp_path, sample, variant, _cast(dtype)))
    _assert_inference_ready(half)
    assert any(str(dtype).removeprefix("torch.") in n for n in half.adapter.notices), half.adapter.notices
    fp32 = moe_export.load(_rewrite(tmp_path, sample, "rounded", _rounded(dtype)))
    assert torch.equal(_logits(half), _logits(fp32))
    assert not torch.equal(_logits(half), _logits(moe_export.load(SAMPLES / sample)))  # the rounding is real


@pytest.fixture(scope="module")
def bf16_bases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tiny-llama saved in bf16, and the same rounded weights saved in fp32."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bf16-base")
    model = AutoModelForCausalLM.from_pretrained(str(SAMPLES / "tiny-llama"), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(str(root / "bf16"))
    model.to(torch.float32).save_pretrained(str(root / "rounded-fp32"))
    for directory in ("bf16", "rounded-fp32"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(SAMPLES / "tiny-llama" / name, root / directory / name)
    return root / "bf16", root / "rounded-fp32"


def test_fp32_adapter_on_bf16_base(tmp_path: Path, bf16_bases: tuple[Path, Path]) -> None:
    """The reference runs in fp32 by default: the bf16 base upcasts exactly, the adapter stays fp32."""
    bf16, rounded = bf16_bases
    on_bf16 = moe_export.load(_rewrite(tmp_path, "moelora", "on-bf16", dict, base=bf16))
    on_fp32 = moe_export.load(_rewrite(tmp_path, "moelora", "on-fp32", dict, base=rounded))
    _assert_inference_ready(on_bf16)
    assert torch.equal(_logits(on_bf16), _logits(on_fp32))
    low = moe_export.load(_rewrite(tmp_path, "moelora", "bf16-ref", dict, base=bf16), dtype=torch.bfloat16)
    assert adapter_tensors_are_inference_ready(low.adapter) == []  # the adapter stays fp32 ...
    q_proj = low.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q_proj.expert_A.dtype == torch.bfloat16 and q_proj.router_weight.dtype == torch.float32  # ... cast per use


def test_merge_into_bf16_base_folds_in_fp32_and_casts_once(tmp_path: Path, bf16_bases: tuple[Path, Path]) -> None:
    bf16, _ = bf16_bases
    ckpt = _rewrite(tmp_path, "lora", "lora-on-bf16", dict, base=bf16)
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(ckpt), "--merge-threshold", "0.9", "-o", str(out)])
    assert result.exit_code == 0, result.output
    merged, base = read_tensor_file(out / "model.safetensors"), read_tensor_file(bf16 / "model.safetensors")
    raw = read_tensor_file(ckpt / "adapter_model.safetensors")
    config = json.loads((ckpt / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    key = "model.layers.1.mlp.down_proj"
    a, b = raw[f"base_model.model.{key}.lora_A.weight"].float(), raw[f"base_model.model.{key}.lora_B.weight"].float()
    want = (base[f"{key}.weight"].float() + scaling * b @ a).to(torch.bfloat16)
    assert merged[f"{key}.weight"].dtype == torch.bfloat16
    assert torch.equal(merged[f"{key}.weight"], want)


def test_shipped_samples_carry_what_training_code_saves() -> None:
    """The quick start (samples/goat) is a bf16 adapter; MoE-PEFT-style .bin samples hold live parameters."""
    goat = read_tensor_file(SAMPLES / "goat" / "adapter_model.safetensors")
    assert {t.dtype for t in goat.values()} == {torch.bfloat16}
    for name in ("mixlora", "mixlora_dynamic", "mixlora_qwen2", "moe_peft_mola", "moe_peft_loramoe"):
        raw = read_tensor_file(SAMPLES / name / "adapter_model.bin")
        assert all(isinstance(t, torch.nn.Parameter) and t.requires_grad for t in raw.values()), name
        _assert_inference_ready(moe_export.load(SAMPLES / name))
