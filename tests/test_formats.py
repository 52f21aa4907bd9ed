"""Seed-family loaders on the committed samples: facts per family, detection, and logits vs the loop oracle."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import moe_export
from moe_export.errors import FormatError, MoeExportError
from moe_export.formats import FAMILIES, LoadOptions, detect_family
from moe_export.formats.checkpoint import open_checkpoint
from moe_export.ir import FFNMoE
from moe_export.loading import load_adapter, load_base_model
from tests.conftest import SAMPLES
from tests.loop_reference import apply_loop_reference


@dataclass(frozen=True)
class Facts:
    """What a seed family's sample must show (see samples/writers/<family>.py)."""

    kwargs: dict[str, Any]
    units: int
    experts: tuple[int, int]  # per decoder layer
    rank: tuple[int | None, int | None]
    k: int | None
    select: str | None
    dtype: str | None
    scaling: tuple[float, float]
    shared: list[str]
    notice: str | None


# fmt: off
FACTS: dict[str, Facts] = {
    "goat": Facts({}, 14, (4, 4), (2, 2), 2, "topk", "float32", (16 / 2, 16 / 2), ["goat_base_correction"], "ETA and SCALING"),
    "mola": Facts({}, 14, (2, 4), (2, 4), 2, "topk", "model", (16 / 2, 16 / 4), [], "does not save top_k"),
    "mmoelora": Facts({"task_id": 1}, 14, (4, 4), (2, 2), 4, "dense", "float32", (32 / 8, 32 / 8), [], "--task-id"),
    "moelora": Facts({}, 8, (4, 4), (2, 2), 2, "topk", "float32", (8 / 2, 8 / 2), [], None),
    "lora": Facts({}, 14, (0, 0), (None, None), None, None, None, (8 / 4, 8 / 4), ["lora"], None),
    "canonical": Facts({}, 14, (2, 4), (2, 4), 2, "topk", "model", (16 / 2, 16 / 4), [], "does not save top_k"),
}
# fmt: on


def sample_dirs() -> list[str]:
    """Every committed checkpoint sample (a directory with an adapter config or manifest)."""
    return sorted(
        d.name
        for d in SAMPLES.iterdir()
        if d.is_dir() and ((d / "adapter_config.json").is_file() or (d / "manifest.json").is_file())
    )


def family_of_sample(name: str) -> str | None:
    """The family a sample directory belongs to: `<family>` or a variant `<family>_<variant>`."""
    owners = [f for f in FAMILIES if name == f or name.startswith(f + "_")]
    return max(owners, key=len) if owners else None


def _layer(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


@pytest.mark.parametrize("family", sorted(FACTS))
def test_loader_facts(family: str) -> None:
    facts = FACTS[family]
    adapter, base_path = load_adapter(SAMPLES / family, options=LoadOptions(**facts.kwargs))
    assert base_path == (SAMPLES / "tiny-llama").resolve()
    assert len(adapter.units) == facts.units
    for unit in adapter.units:
        layer = _layer(unit.name)
        stack, router = unit.experts, unit.router
        assert (stack.num_experts if stack else 0) == facts.experts[layer], unit.name
        assert (stack.rank if stack else None) == facts.rank[layer], unit.name
        scaling = facts.scaling[layer]
        if stack is not None:
            assert torch.allclose(stack.scaling, torch.full_like(stack.scaling, scaling)), unit.name
            assert router.slots == facts.k and router.select == facts.select
            assert router.compute_dtype == facts.dtype
        else:
            assert router is None and unit.shared[0].scaling == pytest.approx(scaling)
        assert [s.origin for s in unit.shared] == facts.shared
    assert (facts.notice or "") in " ".join(adapter.notices)


@pytest.mark.parametrize("name", sample_dirs())
def test_detection_is_unambiguous(name: str) -> None:
    """Each sample is claimed by exactly its own family, among every registered family."""
    family = family_of_sample(name)
    assert family is not None, f"samples/{name} belongs to no registered family"
    ckpt = open_checkpoint(SAMPLES / name)
    assert detect_family(ckpt).name == family
    claimed = [f.name for f in FAMILIES.values() if f.detect(ckpt)]
    assert claimed == [family], f"samples/{name} is claimed by {claimed}"


def test_every_registered_family_has_a_sample() -> None:
    missing = sorted(set(FAMILIES) - {family_of_sample(d) for d in sample_dirs()})
    assert not missing, f"families without a sample directory in samples/: {missing} (add a samples/writers module)"


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def base_logits() -> dict[str, torch.Tensor]:
    return {}


SAMPLE_KWARGS = {"mmoelora": {"task_id": 1}}


@pytest.mark.parametrize("name", sample_dirs())
def test_sample_logits_match_loop_and_differ_from_base(name: str) -> None:
    loaded = moe_export.load(SAMPLES / name, **SAMPLE_KWARGS.get(name, {}))
    ids = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(3))
    if any(isinstance(u, FFNMoE) for u in loaded.adapter.units):  # MixLoRA: the block-level loop oracle
        from tests.test_ffn_moe import apply_loop_ffn

        loop = apply_loop_ffn(load_base_model(loaded.base_model_path), loaded.adapter)
    else:
        loop = apply_loop_reference(load_base_model(loaded.base_model_path), loaded.adapter, loaded.task_id)
    got, want = _logits(loaded.model, ids), _logits(loop, ids)
    base = _logits(load_base_model(loaded.base_model_path), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 0.05 * base.abs().max(), "the sample adapter must visibly change the logits"


def test_mola_top_k_override_per_layer() -> None:
    adapter, _ = load_adapter(SAMPLES / "mola", options=LoadOptions(top_k=[1, 3]))
    assert {_layer(u.name): u.router.top_k for u in adapter.units} == {0: 1, 1: 3}
    assert not any("top_k" in n for n in adapter.notices)
    with pytest.raises(FormatError, match="has 2 experts"):
        load_adapter(SAMPLES / "mola", options=LoadOptions(top_k=3))


def test_mmoelora_needs_a_valid_task_id() -> None:
    with pytest.raises(MoeExportError, match="task"):
        moe_export.load(SAMPLES / "mmoelora")
    with pytest.raises(FormatError, match="out of range"):
        load_adapter(SAMPLES / "mmoelora", options=LoadOptions(task_id=9))


def test_mmoelora_task_weights_follow_the_global_gate() -> None:
    """For a fixed task the unit is one LoRA: sum_e g_e s B_e A_e with g = softmax(GateL Emb[t])."""
    from moe_export.formats.checkpoint import read_tensor_file

    raw = read_tensor_file(SAMPLES / "mmoelora" / "adapter_model.bin")
    emb, gate = raw["lora_task_embedding.weight"], raw["lora_gate.GateL.weight"]
    adapter, _ = load_adapter(SAMPLES / "mmoelora")
    want = torch.softmax(gate @ emb[2], dim=0)
    torch.testing.assert_close(adapter.task_gates["task"].weights(2), want)
    # the per-layer copies of the gate are different tensors, and must not be the ones used
    layer_copy = next(v for k, v in raw.items() if k.endswith("q_proj.lora_task_embedding.weight"))
    assert not torch.equal(layer_copy, emb)


def _copy_with_config(tmp_path: Path, name: str, **changes: Any) -> Path:
    out = tmp_path / name
    shutil.copytree(SAMPLES / name, out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg["base_model_name_or_path"] = str((SAMPLES / "tiny-llama").resolve())
    cfg_path.write_text(json.dumps(cfg))
    return out


def test_lora_rslora_and_alpha_pattern(tmp_path: Path) -> None:
    ckpt = _copy_with_config(tmp_path, "lora", use_rslora=True, alpha_pattern={"q_proj": 2})
    adapter, _ = load_adapter(ckpt)
    for unit in adapter.units:
        alpha = 2 if unit.name.endswith("q_proj") else 8
        assert unit.shared[0].scaling == pytest.approx(alpha / 4**0.5), unit.name


def test_moelora_rslora(tmp_path: Path) -> None:
    adapter, _ = load_adapter(_copy_with_config(tmp_path, "moelora", use_rslora=True))
    assert float(adapter.units[0].experts.scaling[0]) == pytest.approx(8 / 2**0.5)


def test_goat_config_rank_must_match_tensors(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="rank 2"):
        load_adapter(_copy_with_config(tmp_path, "goat", r=16))
