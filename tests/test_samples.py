"""The committed samples equal a fresh run of samples/make_samples.py, so they can never drift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_export.formats.checkpoint import read_tensor_file
from tests.conftest import SAMPLES

MAX_SAMPLES_BYTES = 5 * 1024 * 1024
TENSOR_SUFFIXES = (".safetensors", ".bin")
VOLATILE_JSON_KEYS = {"transformers_version"}  # written by save_pretrained; differs between installs


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from samples.make_samples import make_samples

    out = tmp_path_factory.mktemp("samples")
    make_samples(out)
    return out


def _files(root: Path) -> set[str]:
    skip = ("writers", "__pycache__")
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not any(part in skip for part in p.relative_to(root).parts) and p.name != "make_samples.py"
    }


def _json(path: Path) -> object:
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in VOLATILE_JSON_KEYS}
    return data


def test_committed_samples_equal_a_fresh_run(regenerated: Path) -> None:
    assert _files(SAMPLES) == _files(regenerated), "a sample file is missing or extra: rerun samples/make_samples.py"
    for rel in sorted(_files(SAMPLES)):
        committed, fresh = SAMPLES / rel, regenerated / rel
        if committed.suffix in TENSOR_SUFFIXES:
            want, got = read_tensor_file(committed), read_tensor_file(fresh)
            assert sorted(want) == sorted(got), rel
            for key in want:
                assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), f"{rel}: {key} drifted"
        elif committed.suffix == ".json":
            assert _json(committed) == _json(fresh), f"{rel} drifted"
        else:
            assert committed.read_bytes() == fresh.read_bytes(), f"{rel} drifted"


def test_samples_are_small() -> None:
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < MAX_SAMPLES_BYTES, f"samples/ holds {total / 1e6:.1f} MB"


def test_base_model_has_a_working_tokenizer() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SAMPLES / "tiny-llama"), local_files_only=True)
    ids = tok("the router picks experts").input_ids
    assert ids and max(ids) < 256 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True).strip() == "the router picks experts"
    config = json.loads((SAMPLES / "tiny-llama" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 2, 256)


def test_converted_adapter_reloads_with_its_own_loader() -> None:
    """samples/canonical was converted from MoLA: the IR keeps its origin, reloading needs the canonical loader."""
    import moe_export

    loaded = moe_export.load(SAMPLES / "canonical")
    assert loaded.adapter.family == "mola"
    assert loaded.loader_family == "canonical"
