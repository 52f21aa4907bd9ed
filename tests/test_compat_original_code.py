"""Independent check against the original code: MoE-PEFT 2.0.2 and mixlora 0.2.3 build, run and save.

Their code builds each adapter on the tiny base model (LoRA B randomised: they initialise it to zero),
takes reference logits from their own forward, saves with MoE-PEFT's `save_adapter_weight`; we load
the saved directory with our loader and our reference must reproduce their logits. The same saves then
go through every command (inspect, onnx plain and merged, validate, merge): ONNX Runtime must reproduce
their logits too (issue 11: these saves hold grad-flagged parameters, which once broke the export).
Install the packages with `.ci/compat-install` (test-only, --no-deps); without them this file is skipped.

Workarounds for their code on transformers 5 / torch 2.13 (each the smallest that works):
- `datasets` / `evaluate` are imported by moe_peft's training/evaluation modules at package import but
  unused by the model; when missing, empty stand-in modules are put in sys.modules for that import.
- `LLMModel.from_pretrained` needs `accelerate` (it passes device_map); we load the HF model ourselves
  and call `moe_peft.models.from_pretrained`, as it does.
- transformers 5 moved `rope_theta` into `config.rope_parameters`; moe-peft reads `config.rope_theta`
  and `config.rope_scaling`, so both are set on the config before conversion.
- Their LoRA modules live in plain dicts (formats.md section 8): `model.eval()` does not reach them, so
  each is put in eval mode, and moe-peft's fast path (which applies dropout even in eval) is disabled
  with `efficient_operator_=False` (what MOE_PEFT_EVALUATE_MODE=1 does).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import moe_export

if importlib.util.find_spec("moe_peft") is None or importlib.util.find_spec("mixlora") is None:
    pytest.skip(
        "the original packages are not installed (run .ci/compat-install: moe_peft 2.0.2, mixlora 0.2.3)",
        allow_module_level=True,
    )


def _import_originals() -> tuple[Any, Any]:
    stubs = [name for name in ("datasets", "evaluate") if importlib.util.find_spec(name) is None]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for name in stubs:
        sys.modules[name] = types.ModuleType(name)
    try:
        import mixlora
        import moe_peft
        import moe_peft.models
        import moe_peft.trainer
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
        root.handlers[:], root.level = handlers, level  # moe_peft's setup_logging(force=True) replaced them
    return moe_peft, mixlora


moe_peft, mixlora = _import_originals()
ADAPTER = "compat"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.05, "target_modules": TARGETS}
CONFIGS: dict[str, dict[str, Any]] = {
    "mixlora-topk": {**COMMON, "peft_type": "MIXLORA", "routing_strategy": "mixlora", "num_experts": 4, "top_k": 2},
    "mixlora-dynamic": {
        **COMMON,
        "peft_type": "MIXLORA",
        "routing_strategy": "mixlora-dynamic",
        "num_experts": 4,
        "top_p": 0.6,
        "temperature": 0.5,  # the quirk: divides the probabilities, and so the weights
        "expert_lora": {"r": 4, "lora_alpha": 16, "lora_dropout": 0.05},
        "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"],
    },
    "moe-peft-mola": {**COMMON, "peft_type": "MOLA", "routing_strategy": "mola", "num_experts": 4, "top_k": 2},
    "moe-peft-loramoe": {**COMMON, "peft_type": "LORAMOE", "routing_strategy": "loramoe", "num_experts": 3},
}
FAMILY = {"mixlora-topk": "mixlora", "mixlora-dynamic": "mixlora", "moe-peft-mola": "moe_peft_mola",
          "moe-peft-loramoe": "moe_peft_loramoe"}  # fmt: skip
# fp32 on both sides; their order of float operations differs from ours (measured max abs diff ~1e-7
# on logits of size ~1), atol covers logits near zero where a relative bound alone is meaningless.
RTOL, ATOL = 1e-5, 1e-5


def _hf_model(base: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def _moe_peft_model(base: Path, config: dict[str, Any], seed: int) -> Any:
    hf = _hf_model(base)
    hf.config.rope_theta = hf.config.rope_parameters["rope_theta"]
    hf.config.rope_scaling = None
    model = moe_peft.LLMModel(moe_peft.models.from_pretrained(hf, attn_impl="eager", device="cpu"))
    adapter_config = moe_peft.adapters.lora_config_factory(dict(config))
    adapter_config.adapter_name = ADAPTER
    model.init_adapter(adapter_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model_.layers_:
            attn, mlp = layer.state_dict()
            for linear in [*attn.values(), *mlp.values()]:
                for lora in linear.loras_.values():
                    lora.eval()  # dropout off: their modules are not registered submodules
                    lora.lora_b_.weight.normal_(0.0, 0.1, generator=g)
                for moe in linear.moes_.values():
                    moe.gate_.weight.normal_(0.0, 0.5, generator=g)  # sharper routing than their init
            for moe in layer.mlp_.moes_.values():
                moe.gate_.weight.normal_(0.0, 0.5, generator=g)
    return model


def _moe_peft_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    from moe_peft.common import LLMBatchConfig, LLMModelInput

    batch = LLMModelInput(
        batch_configs_=[LLMBatchConfig(ADAPTER, 0, ids.shape[0])],
        batch_tokens_=ids.tolist(),
        inference_mode_=True,
        efficient_operator_=False,  # the fast path applies LoRA dropout even at inference
    )
    with torch.no_grad():
        return model.forward(batch)[0].logits


def _save(model: Any, out: Path) -> Path:
    train_config = types.SimpleNamespace(adapter_name=ADAPTER, task_=types.SimpleNamespace(peft_task_type="CAUSAL_LM"))
    moe_peft.trainer.save_adapter_weight(model, train_config, str(out))
    return out / ADAPTER


def _our_logits(ckpt: Path, base: Path, ids: torch.Tensor, family: str) -> torch.Tensor:
    loaded = moe_export.load(ckpt, base_model=base)
    assert loaded.family == family
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_moe_peft_forward_matches_our_reference(tiny_base: Path, tmp_path: Path, case: str) -> None:
    model = _moe_peft_model(tiny_base, CONFIGS[case], seed=sorted(CONFIGS).index(case))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    theirs = _moe_peft_logits(model, ids)
    torch.testing.assert_close(_moe_peft_logits(model, ids), theirs, rtol=0, atol=0)  # dropout really is off
    with torch.no_grad():
        base = _hf_model(tiny_base)(input_ids=ids).logits
    assert (theirs - base).abs().max() > 0.05, "the randomised adapter must change their logits"
    ckpt = _save(model, tmp_path)
    ours = _our_logits(ckpt, tiny_base, ids, FAMILY[case])
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)


def test_mixlora_package_forward_matches_our_reference(tiny_base: Path, tmp_path: Path) -> None:
    """mixlora 0.2.3 (HF modeling + injected MoE) reads MoE-PEFT's save; it runs top-k MixLoRA only."""
    ckpt = _save(_moe_peft_model(tiny_base, CONFIGS["mixlora-topk"], seed=7), tmp_path)
    model, _ = mixlora.MixLoraModelForCausalLM.from_pretrained(str(ckpt))
    model.eval()
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()  # kept in a plain dict: model.eval() misses them
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    torch.testing.assert_close(_our_logits(ckpt, tiny_base, ids, "mixlora"), theirs, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- the whole pipeline on their saves

PIPELINE_IDS = (2, 9)  # [batch, sequence] fed to their forward and to ONNX Runtime
PARITY_REL = 1e-5  # max |ORT - theirs| / max |theirs|, fp32 on both sides (issue 11)


def _ort_logits(model_path: Path, ids: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    from moe_export.export.manifest import ExportManifest

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
    feeds = ExportManifest.load(model_path.parent).interface.complete_feeds(feeds)  # a decoder's first step (past 0)
    return torch.from_numpy(session.run(["logits"], feeds)[0])


def _parity(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want| / max |want|, top-1 agreement)."""
    rel = float((got.double() - want.double()).abs().max() / want.double().abs().max())
    return rel, float((got.argmax(-1) == want.argmax(-1)).double().mean())


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from moe_export.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"moe-export {' '.join(args[:1])} exited {result.exit_code}: {result.output[-2000:]}"
    return result


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_their_save_through_inspect_onnx_validate_merge(tiny_base: Path, tmp_path: Path, case: str) -> None:
    """A checkpoint written by MoE-PEFT's own `save_adapter_weight` (what its trainer calls) goes through every
    command; ONNX Runtime reproduces MoE-PEFT's own forward. Before issue 11 every one of these failed
    `onnx` (their .bin holds live parameters: torch.load returns them with requires_grad=True)."""
    import json

    from transformers import AutoModelForCausalLM

    from moe_export.export.manifest import ExportManifest

    model = _moe_peft_model(tiny_base, CONFIGS[case], seed=11 + sorted(CONFIGS).index(case))
    ids = torch.randint(0, 64, PIPELINE_IDS, generator=torch.Generator().manual_seed(9))
    theirs = _moe_peft_logits(model, ids)
    ckpt = _save(model, tmp_path / "saved")
    raw = torch.load(ckpt / "adapter_model.bin", weights_only=True)
    assert all(t.requires_grad for t in raw.values()), "their save path writes live (grad-flagged) parameters"

    info = json.loads(_cli("inspect", str(ckpt), "--base", str(tiny_base), "--json").stdout)
    assert info["family"] == FAMILY[case]

    plain = tmp_path / "onnx"
    _cli("onnx", str(ckpt), "--base", str(tiny_base), "-o", str(plain))  # ends with its own validate gate
    rel, top1 = _parity(_ort_logits(plain / "model.onnx", ids), theirs)
    assert rel <= PARITY_REL and top1 == 1.0, f"ORT vs MoE-PEFT: rel {rel:.3g}, top-1 {top1}"

    # Issue 20: their save exported in fp16 validates (exit 0), every flip listed with its margin and a near-tie.
    half = tmp_path / "onnx-fp16"
    _cli("onnx", str(ckpt), "--base", str(tiny_base), "-o", str(half), "--dtype", "fp16", "--no-validate")
    report = json.loads(_cli("validate", str(half), "--json").stdout)
    assert report["passed"], report["failures"]
    for comparison in report["comparisons"]:
        assert len(comparison["flips"]) == comparison["flip_count"]
        assert all(f["near_tie"] and f["margin"] <= f["bound"] for f in comparison["flips"])

    merged_onnx = tmp_path / "onnx-merged"
    _cli(
        "onnx", str(ckpt), "--base", str(tiny_base), "-o", str(merged_onnx), "--merge-threshold", "0.9", "--no-validate"
    )
    _cli("validate", str(merged_onnx))
    plan = ExportManifest.load(merged_onnx).merge_plan
    assert plan is not None
    approximate = [u["name"] for u in plan["units"] if u["reason"] not in ("exact-shared", "exact-single-expert")]
    rel_merged, top1_merged = _parity(_ort_logits(merged_onnx / "model.onnx", ids), theirs)
    if not approximate:  # only exact folds: still their model
        assert rel_merged <= PARITY_REL and top1_merged == 1.0, f"merged: rel {rel_merged:.3g}, top-1 {top1_merged}"

    merged_hf = tmp_path / "merged"
    _cli(
        "merge", str(ckpt), "--base", str(tiny_base), "--merge-threshold", "0.9", "--samples", "8", "-o", str(merged_hf)
    )
    AutoModelForCausalLM.from_pretrained(str(merged_hf), local_files_only=True)  # plain transformers loads it
    if (merged_hf / "adapter").is_dir() and not approximate:
        with torch.no_grad():
            pair = moe_export.load(merged_hf / "adapter").model(input_ids=ids).logits
        rel_pair, top1_pair = _parity(pair, theirs)
        assert rel_pair <= PARITY_REL and top1_pair == 1.0, f"merged dir + adapter: rel {rel_pair:.3g}"
    print(f"\n{case}: ORT vs MoE-PEFT rel {rel:.2e} top-1 {top1:.3f}; merged export rel {rel_merged:.2e} "
          f"top-1 {top1_merged:.3f} (approximate folds: {len(approximate)})")  # fmt: skip
