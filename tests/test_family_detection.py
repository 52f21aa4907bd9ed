"""Auto-detection over every committed sample: each directory is claimed by exactly its family.

The table is explicit (a sample without a row fails), and near-miss layouts (one family's keys in
another's config, a HydraLoRA with per-expert A, a plain LoRA) must not be claimed by the wrong family.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moe_export.errors import FormatError
from moe_export.formats import FAMILIES, detect_family
from moe_export.formats.checkpoint import open_checkpoint, read_tensor_file
from tests.conftest import SAMPLES

EXPECTED = {
    "canonical": "canonical",
    "goat": "goat",
    "goat_mistral": "goat",
    "hydralora": "hydralora",
    "lora": "lora",
    "loramoe": "loramoe",
    "mixlora": "mixlora",
    "mixlora_dynamic": "mixlora",
    "mixlora_qwen2": "mixlora",
    "mmoelora": "mmoelora",
    "moe_peft_loramoe": "moe_peft_loramoe",
    "moe_peft_mola": "moe_peft_mola",
    "moe_peft_mola_llama3": "moe_peft_mola",
    "moelora": "moelora",
    "mola": "mola",
}


def sample_dirs() -> list[str]:
    return sorted(
        d.name
        for d in SAMPLES.iterdir()
        if d.is_dir() and any((d / n).is_file() for n in ("adapter_config.json", "manifest.json"))
    )


def test_table_covers_every_sample_and_family() -> None:
    assert sorted(EXPECTED) == sample_dirs(), "add a row for each sample directory (and only for those)"
    assert sorted(set(EXPECTED.values())) == sorted(FAMILIES), "every registered family needs a sample"


@pytest.mark.parametrize("sample", sorted(EXPECTED))
def test_detects_exactly_its_family(sample: str) -> None:
    ckpt = open_checkpoint(SAMPLES / sample)
    claimed = sorted(f.name for f in FAMILIES.values() if f.detect(ckpt))
    assert claimed == [EXPECTED[sample]], f"samples/{sample} is claimed by {claimed}"
    assert detect_family(ckpt).name == EXPECTED[sample]


def _variant(tmp_path: Path, sample: str, config: dict, rename: tuple[str, str] | None) -> Path:
    """A copy of a sample with config keys changed (None deletes the key) and tensor keys renamed."""
    out = tmp_path / sample
    shutil.copytree(SAMPLES / sample, out)
    path = out / "adapter_config.json"
    merged = {**json.loads(path.read_text()), **config}
    path.write_text(json.dumps({k: v for k, v in merged.items() if v is not None}))
    if rename is not None:
        tensors = read_tensor_file(out / "adapter_model.bin")
        torch.save({k.replace(*rename): v for k, v in tensors.items()}, out / "adapter_model.bin")
    return out


# case -> (sample, config changes, key rename, families that must claim it)
NEAR_MISSES: dict[str, tuple[str, dict, tuple[str, str] | None, list[str]]] = {
    # a MoE-PEFT peft_type that disagrees with the key prefix: neither family claims it
    "mola-keys-loramoe-type": ("moe_peft_mola", {"peft_type": "LORAMOE"}, None, []),
    "mixlora-keys-mola-type": ("mixlora", {"peft_type": "MOLA"}, None, []),
    # without a peft_type the MoE-PEFT prefix alone decides
    "mixlora-no-peft-type": ("mixlora", {"peft_type": None}, None, ["mixlora"]),
    "loramoe-no-peft-type": ("moe_peft_loramoe", {"peft_type": None}, None, ["moe_peft_loramoe"]),
    # a HydraLoRA whose shared A is renamed to a per-expert A0 is LoRAMoE's layout, never plain LoRA's
    "hydra-per-expert-a": ("hydralora", {}, (".lora_A.weight", ".lora_A0.weight"), ["loramoe"]),
    # the old-peft families say peft_type LORA; another peft_type is not theirs
    "loramoe-other-type": ("loramoe", {"peft_type": "MOLA"}, None, []),
    "hydra-other-type": ("hydralora", {"peft_type": "GOAT"}, None, []),
}


@pytest.mark.parametrize("case", sorted(NEAR_MISSES))
def test_near_miss_layouts(tmp_path: Path, case: str) -> None:
    sample, config, rename, want = NEAR_MISSES[case]
    ckpt = open_checkpoint(_variant(tmp_path, sample, config, rename))
    assert sorted(f.name for f in FAMILIES.values() if f.detect(ckpt)) == want
    if not want:
        with pytest.raises(FormatError, match="no known family"):
            detect_family(ckpt)
