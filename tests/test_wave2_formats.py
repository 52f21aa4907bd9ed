"""Second-wave families (MixLoRA, MoE-PEFT MoLA / LoRAMoE, LoRAMoE, HydraLoRA) on the committed samples.

Facts per sample, MixLoRA logits vs the per-token FFN loop, one ONNX Runtime export, and bad input.
The linear-only samples are also checked against the loop oracle in tests/test_formats.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import moe_export
from moe_export.errors import FormatError
from moe_export.formats import LoadOptions
from moe_export.formats.checkpoint import read_tensor_file
from moe_export.ir import FFNMoE, LinearMoE
from moe_export.reference.loading import load_adapter, load_base_model
from tests.conftest import SAMPLES
from tests.test_ffn_moe import apply_loop_ffn

# sample -> facts: units by kind, experts, selection, rank / scaling of the routed stacks, router dtype
FACTS: dict[str, dict[str, Any]] = {
    "mixlora": dict(
        family="mixlora", kinds={"ffn_moe": 2, "linear_moe": 8}, E=4, select="topk", k=2, rank=2, scaling=4 / 2,
        dtype="float32", projections=["down_proj", "gate_proj", "up_proj"], shared_scaling=4 / 2,
    ),
    "mixlora_dynamic": dict(
        family="mixlora", kinds={"ffn_moe": 2, "linear_moe": 4}, E=4, select="top_p", k=4, rank=4, scaling=16 / 4,
        dtype="float32", projections=["down_proj", "gate_proj"], shared_scaling=4 / 2,
    ),
    "moe_peft_mola": dict(
        family="moe_peft_mola", kinds={"linear_moe": 14}, E=4, select="topk", k=2, rank=2, scaling=4 / 2,
        dtype="float32", routed=14,
    ),
    "moe_peft_loramoe": dict(
        family="moe_peft_loramoe", kinds={"linear_moe": 10}, E=3, select="dense", k=3, rank=2, scaling=4 / 2,
        dtype="float32", routed=6, shared_scaling=4 / 2,
    ),
    "loramoe": dict(
        family="loramoe", kinds={"linear_moe": 6}, E=4, select="dense", k=4, rank=2, scaling=8 / 2,
        dtype="model", routed=6,
    ),
    "hydralora": dict(
        family="hydralora", kinds={"linear_moe": 6}, E=3, select="dense", k=3, rank=2, scaling=4 / 2,
        dtype="model", routed=6, shared_a=True,
    ),
}  # fmt: skip


def _stacks(unit: LinearMoE | FFNMoE) -> list:
    return list(unit.experts.values()) if isinstance(unit, FFNMoE) else [unit.experts]


@pytest.mark.parametrize("name", sorted(FACTS))
def test_sample_facts(name: str) -> None:
    facts = FACTS[name]
    adapter, _ = load_adapter(SAMPLES / name)
    assert adapter.family == facts["family"]
    kinds: dict[str, int] = {}
    for unit in adapter.units:
        kinds[unit.kind] = kinds.get(unit.kind, 0) + 1
    assert kinds == facts["kinds"]
    routed = adapter.routed_units
    assert len(routed) == facts.get("routed", kinds.get("ffn_moe"))
    for unit in routed:
        router = unit.router
        assert (router.num_experts, router.select, router.slots, router.compute_dtype) == (
            facts["E"], facts["select"], facts["k"], facts["dtype"]
        ), unit.name  # fmt: skip
        assert router.renormalize == (facts["select"] == "topk"), unit.name
        for stack in _stacks(unit):
            assert stack.rank == facts["rank"] and (stack.A.shape[0] == 1) == facts.get("shared_a", False)
            assert torch.allclose(stack.scaling, torch.full_like(stack.scaling, facts["scaling"])), unit.name
        if isinstance(unit, FFNMoE):
            assert sorted(unit.experts) == facts["projections"] and unit.act_fn == "silu"
    for unit in adapter.units:
        if not unit.routed:
            assert unit.name.split(".")[3] == "self_attn"  # MixLoRA / LoRAMoE: plain LoRA on attention
            assert unit.shared[0].scaling == pytest.approx(facts["shared_scaling"])


@pytest.mark.parametrize("name", ["mixlora", "mixlora_dynamic"])
def test_mixlora_sample_matches_loop(name: str) -> None:
    loaded = moe_export.load(SAMPLES / name)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    loop = apply_loop_ffn(load_base_model(loaded.base_model_path), loaded.adapter)
    base = load_base_model(loaded.base_model_path)
    with torch.no_grad():
        got, want, plain = (m(input_ids=ids).logits for m in (loaded.model, loop, base))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 0.05 * plain.abs().max(), "the sample adapter must visibly change the logits"


def test_mixlora_top_k_override() -> None:
    adapter, _ = load_adapter(SAMPLES / "mixlora", options=LoadOptions(top_k=1))
    assert {u.router.top_k for u in adapter.routed_units} == {1}
    # top-p routers have no k to override: the option is refused, not silently ignored
    with pytest.raises(FormatError, match="no top-k router"):
        load_adapter(SAMPLES / "mixlora_dynamic", options=LoadOptions(top_k=1))


def test_mixlora_onnx_runtime_parity(tmp_path_factory: pytest.TempPathFactory) -> None:
    """export_onnx gives one GroupedLoRASlots node per adapted projection; ORT matches the reference."""
    import onnx
    import onnxruntime as ort

    from tests.artifacts import sample_export

    result = sample_export(tmp_path_factory, SAMPLES / "mixlora")  # the session's export, shared with test_onnx_export
    nodes = [n for n in onnx.load(str(result.model_path)).graph.node if n.domain == "moe_export"]
    assert sorted({n.op_type for n in nodes}) == ["GroupedLoRASlots"] and len(nodes) == 2 * 3
    reference = moe_export.load(SAMPLES / "mixlora").model
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    for shape in ((1, 1), (3, 13)):
        ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(shape[1]))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            want = reference(input_ids=ids, attention_mask=mask).logits.numpy()
        feeds = result.manifest.interface.complete_feeds({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        got = session.run(["logits"], feeds)[0]  # the decoder's first step (past length 0)
        # rtol 1e-4 per element, plus 1e-4 of the largest logit: logits near zero have no meaningful
        # relative error (the same "relative to the max reference" definition as validation/parity.py).
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert (got.argmax(-1) == want.argmax(-1)).all(), "top-1 tokens must agree everywhere"


# --------------------------------------------------------------------------- bad input


def _copy(
    tmp_path: Path,
    name: str,
    config: dict[str, Any] | None = None,
    drop: str | None = None,
    add: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A copy of a sample with config changes, the keys ending in `drop` removed, or tensors added."""
    out = tmp_path / name
    shutil.copytree(SAMPLES / name, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(config or {})
    cfg["base_model_name_or_path"] = str((SAMPLES / "tiny-llama").resolve())
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    if drop or add:
        tensors = read_tensor_file(out / "adapter_model.bin")
        tensors = {k: v for k, v in tensors.items() if not (drop and k.endswith(drop))}
        tensors.update(add or {})
        torch.save(tensors, out / "adapter_model.bin")
    return out


BAD = {
    "switch": ("mixlora", {"config": {"routing_strategy": "mixlora-switch"}}, "mixlora-switch' is not supported"),
    "legacy": ("mixlora", {"config": {"routing_strategy": "mixtral"}}, "legacy MixLoRA"),
    "experts": ("mixlora", {"config": {"num_experts": 8}}, "says 8 experts"),
    "rank": ("mixlora", {"config": {"r": 8}}, "r=8"),
    "no-gate": ("mixlora", {"drop": "layers.1.mlp.moe_gate.weight"}, "moe_gate.weight"),
    "classifier": ("mixlora", {"add": {"classifier": torch.zeros(2, 64)}}, "sequence-classification"),
    "task": ("moe_peft_mola", {"config": {"task_type": "SEQ_CLS"}}, "task_type"),
    "mola-gate": ("moe_peft_mola", {"drop": "layers.0.mlp.up_proj.moe_gate.weight"}, "no moe_gate"),
    "mola-expert": ("moe_peft_mola", {"drop": "layers.0.mlp.up_proj.experts.1.lora_B.weight"}, "lacks lora_B"),
    "per-layer-E": ("moe_peft_loramoe", {"config": {"num_experts": [3, 3]}}, "one integer"),
    "lora_nums": ("loramoe", {"config": {"lora_nums": 5}}, "lora_nums=5"),
    "loramoe-route": ("loramoe", {"drop": "layers.0.mlp.up_proj.lora_route.weight"}, "no lora_route"),
    "hydra-B": ("hydralora", {"drop": "layers.1.mlp.down_proj.lora_B1.weight"}, "not 0..E-1"),
    "hydra-extra": ("hydralora", {"add": {"base_model.model.lm_head.weight": torch.zeros(3, 3)}}, "unexpected"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_give_one_line_format_errors(tmp_path: Path, case: str) -> None:
    name, changes, message = BAD[case]
    ckpt = _copy(tmp_path, name, **changes)
    with pytest.raises(FormatError, match=message) as info:
        load_adapter(ckpt)
    assert "\n" not in str(info.value)


def test_bad_checkpoint_cli_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moe_export.cli import app

    ckpt = _copy(tmp_path, "mixlora_dynamic", config={"routing_strategy": "mixlora-switch"})
    result = CliRunner().invoke(app, ["inspect", str(ckpt)])
    assert result.exit_code == 2 and "mixlora-switch" in result.output and "Traceback" not in result.output


def test_mixlora_act_fn_falls_back_to_base_hidden_act(tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(SAMPLES / "tiny-llama", base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    adapter, _ = load_adapter(SAMPLES / "mixlora_dynamic", base_model=base)  # saves no act_fn
    assert {u.act_fn for u in adapter.routed_units} == {"gelu"}
    adapter, _ = load_adapter(SAMPLES / "mixlora", base_model=base)  # saves act_fn = silu
    assert {u.act_fn for u in adapter.routed_units} == {"silu"}
