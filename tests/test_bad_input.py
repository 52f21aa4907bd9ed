"""Malformed checkpoints fail with one clear FormatError (API) / one line and exit 2 (CLI), never a traceback."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.errors import MoeExportError
from moe_export.formats.checkpoint import read_tensor_file
from moe_export.reference.loading import load_adapter
from tests.conftest import SAMPLES, copy_sample

BASE = (SAMPLES / "tiny-llama").resolve()


def _rewrite_tensors(ckpt: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import save_file

    path = ckpt / "adapter_model.safetensors"
    tensors = read_tensor_file(path)
    change(tensors)
    save_file(tensors, str(path))


class _Payload:
    """A pickle that runs a shell command when loaded (what weights_only loading must refuse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def missing_config(tmp_path: Path) -> tuple[Path, list[str], str]:
    ckpt = copy_sample(tmp_path, "goat")
    (ckpt / "adapter_config.json").unlink()
    return ckpt, [], "adapter_config.json"


def unexpected_keys(tmp_path: Path) -> tuple[Path, list[str], str]:
    ckpt = copy_sample(tmp_path, "goat")
    _rewrite_tensors(
        ckpt, lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_E.weight": torch.ones(2, 2)})
    )
    return ckpt, [], "unexpected tensor"


def shape_mismatch(tmp_path: Path, tiny_base: Path) -> tuple[Path, list[str], str]:
    return copy_sample(tmp_path, "lora"), ["--base", str(tiny_base)], "the adapter expects"


def nan_weights(tmp_path: Path) -> tuple[Path, list[str], str]:
    ckpt = copy_sample(tmp_path, "lora")

    def poison(t: dict[str, torch.Tensor]) -> None:
        key = sorted(t)[0]
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")

    _rewrite_tensors(ckpt, poison)
    return ckpt, [], "NaN"


def path_is_a_file(tmp_path: Path) -> tuple[Path, list[str], str]:
    return SAMPLES / "goat" / "adapter_config.json", [], "is a file"


def no_such_dir(tmp_path: Path) -> tuple[Path, list[str], str]:
    return tmp_path / "nowhere", [], "no such checkpoint directory"


def unknown_family(tmp_path: Path) -> tuple[Path, list[str], str]:
    return SAMPLES / "goat", ["--family", "nosuch"], "unknown family 'nosuch'"


def wrong_family(tmp_path: Path) -> tuple[Path, list[str], str]:
    return SAMPLES / "mola", ["--family", "goat"], "missing keys"


def bad_top_k(tmp_path: Path) -> tuple[Path, list[str], str]:
    return SAMPLES / "mola", ["--top-k", "two"], "--top-k"


CASES = {
    "missing-config": missing_config,
    "unexpected-keys": unexpected_keys,
    "shape-mismatch": shape_mismatch,
    "nan-weights": nan_weights,
    "path-is-file": path_is_a_file,
    "no-such-dir": no_such_dir,
    "unknown-family": unknown_family,
    "wrong-family": wrong_family,
    "bad-top-k": bad_top_k,
}


def _build(name: str, tmp_path: Path, tiny_base: Path) -> tuple[Path, list[str], str]:
    build = CASES[name]
    return build(tmp_path, tiny_base) if name == "shape-mismatch" else build(tmp_path)


def _api_kwargs(args: list[str]) -> dict:
    opts = dict(zip(args[::2], args[1::2], strict=True))
    return {"base_model": opts.get("--base"), "family": opts.get("--family")}


@pytest.mark.parametrize("name", [c for c in CASES if c != "bad-top-k"])
def test_bad_input_api(name: str, tmp_path: Path, tiny_base: Path) -> None:
    ckpt, args, message = _build(name, tmp_path, tiny_base)
    with pytest.raises(MoeExportError, match=message) as info:
        load_adapter(ckpt, **_api_kwargs(args))
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_cli(name: str, tmp_path: Path, tiny_base: Path) -> None:
    ckpt, args, message = _build(name, tmp_path, tiny_base)
    result = CliRunner().invoke(app, ["inspect", str(ckpt), *args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0] and "Traceback" not in result.output


def test_malicious_pickle_is_not_executed(tmp_path: Path) -> None:
    marker = Path(f"/tmp/pwned_{uuid.uuid4().hex}")
    ckpt = copy_sample(tmp_path, "mola")
    torch.save(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A_0.weight": _Payload(marker)},
        ckpt / "adapter_model.bin",
    )
    with pytest.raises(MoeExportError, match="refused to unpickle"):
        load_adapter(ckpt)
    result = CliRunner().invoke(app, ["inspect", str(ckpt)])
    assert result.exit_code == 2 and "refused to unpickle" in result.stderr
    assert "adapter_model.bin" in result.stderr
    assert not marker.exists(), "loading the checkpoint ran the pickle's payload"
