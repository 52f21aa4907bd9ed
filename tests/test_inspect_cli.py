"""`moe-export inspect`: JSON facts checked against the raw checkpoint files, table output, a real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.formats.checkpoint import read_tensor_file
from tests.conftest import REPO, SAMPLES


def _inspect_json(*args: str) -> dict:
    result = CliRunner().invoke(app, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stdout holds JSON only


def _raw(name: str) -> dict[str, torch.Tensor]:
    path = next(p for p in (SAMPLES / name).iterdir() if p.name.startswith("adapter_model"))
    return read_tensor_file(path)


def test_goat_json_counts_match_the_checkpoint() -> None:
    info = _inspect_json(str(SAMPLES / "goat"))
    raw = _raw("goat")
    experts = sum(t.numel() for k, t in raw.items() if (".lora_A." in k or ".lora_B." in k) and "moe_layer" not in k)
    routers = sum(t.numel() for k, t in raw.items() if k.endswith("lora_gating.weight"))
    modules = {k.split(".lora_gating")[0].removeprefix("base_model.model.") for k in raw if "lora_gating" in k}
    assert info["family"] == "goat" and info["layout"] == "goat"
    assert {u["module"] for u in info["units"]} == modules
    assert info["parameters"]["experts"] == experts and info["parameters"]["router"] == routers
    assert all(u["num_experts"] == 4 and u["k"] == 2 and u["rank"] == 2 for u in info["units"])
    assert all([s["origin"] for s in u["shared"]] == ["goat_base_correction"] for u in info["units"])
    assert info["units"][0]["router"]["compute_dtype"] == "float32"
    assert any("ETA" in n for n in info["notices"])


def test_mola_top_k_per_layer_and_expert_counts() -> None:
    info = _inspect_json(str(SAMPLES / "mola"), "--top-k", "1,3")
    raw = _raw("mola")
    for unit in info["units"]:
        layer = int(unit["module"].split(".layers.")[1].split(".")[0])
        router = raw[f"base_model.model.{unit['module']}.router.router.weight"]
        assert unit["num_experts"] == router.shape[0]
        assert unit["k"] == (1, 3)[layer]
        assert unit["router"]["compute_dtype"] == "model"
    assert not any("top_k" in n for n in info["notices"])


def test_mmoelora_task_weights() -> None:
    info = _inspect_json(str(SAMPLES / "mmoelora"), "--task-id", "2")
    raw = _raw("mmoelora")
    want = torch.softmax(raw["lora_gate.GateL.weight"] @ raw["lora_task_embedding.weight"][2], dim=0)
    got = torch.tensor(info["task_gates"]["task"]["weights_for_task"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # the JSON rounds to 6 decimals
    assert all(u["router"]["kind"] == "task" for u in info["units"])


def test_table_output_for_people() -> None:
    result = CliRunner().invoke(app, ["inspect", str(SAMPLES / "lora")])
    assert result.exit_code == 0, result.output
    assert "LoRA (PEFT)" in result.stdout and "model.layers.1.mlp.down_proj" in result.stdout
    assert "14 units (0 routed)" in result.stdout


def test_canonical_layout_is_reported(tmp_path) -> None:
    info = _inspect_json(str(SAMPLES / "canonical"))
    assert info["layout"] == "canonical" and info["family"] == "mola"


def _moe_export(*args: str) -> subprocess.CompletedProcess:
    """Run the installed console script, as a user would (the venv's, when pytest runs from it)."""
    exe = shutil.which("moe-export") or str(Path(sys.executable).parent / "moe-export")
    return subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_real_subprocess_inspect_json() -> None:
    proc = _moe_export("inspect", "samples/goat", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["family"] == "goat" and info["num_units"] == 14
