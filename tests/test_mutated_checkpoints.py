"""Property: a sample checkpoint mutated at random either still loads and runs (finite logits), or is refused
with exit 2 and one line - never a traceback, never exit 1 (a failed gate) or 3 (our bug) on bad input.

The example count is small so the test runs in seconds; a failure prints the mutation that broke it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import moe_export
from moe_export.cli import app
from moe_export.formats.checkpoint import read_tensor_file
from tests.conftest import SAMPLES

BASE = (SAMPLES / "tiny-llama").resolve()
# One safetensors and two .bin layouts, a top-k, a dense and an FFN-level family.
NAMES = ("goat", "mola", "mixlora", "hydralora")

CONFIG_KEYS = (
    "num_experts",
    "expert_num",
    "r",
    "lora_alpha",
    "top_k",
    "target_modules",
    "peft_type",
    "routing_strategy",
)
CONFIG_VALUES = st.sampled_from([-1, 0, 1, 2, 3, 100, 2.5, "x", None, [], {}, True])
DTYPES = st.sampled_from([torch.int32, torch.int64, torch.bool, torch.float64, torch.float16, torch.uint8])

mutation = st.one_of(
    st.tuples(st.just("drop_key"), st.integers(0, 10_000)),
    st.tuples(st.just("extra_key"), st.sampled_from(["junk", "base_model.model.model.layers.0.mlp.lora_Z.weight"])),
    st.tuples(st.just("reshape"), st.integers(0, 10_000), st.sampled_from([-1, 1, "T"])),
    st.tuples(st.just("dtype"), st.integers(0, 10_000), DTYPES),
    st.tuples(st.just("nonfinite"), st.integers(0, 10_000), st.sampled_from([float("nan"), float("inf")])),
    st.tuples(st.just("config"), st.sampled_from(CONFIG_KEYS), CONFIG_VALUES),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.99)),
    st.tuples(st.just("config_text"), st.sampled_from(["", "{", "[]", "null", '{"peft_type": 3}'])),
)


def _weights(ckpt: Path) -> Path:
    return next(p for p in ckpt.iterdir() if p.name.startswith("adapter_model."))


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)


def mutate(ckpt: Path, change: tuple) -> None:
    kind = change[0]
    config = ckpt / "adapter_config.json"
    if kind in ("config", "config_text"):
        if kind == "config_text":
            config.write_text(change[1])
            return
        try:
            data = json.loads(config.read_text())
        except ValueError:  # an earlier config_text change broke the file: nothing more to mutate
            return
        if not isinstance(data, dict):
            return
        data[change[1]] = change[2]
        config.write_text(json.dumps(data))
        return
    path = _weights(ckpt)
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * change[1])])
        return
    try:
        tensors = read_tensor_file(path)
    except Exception:  # an earlier mutation broke the file: nothing more to mutate
        return
    keys = sorted(tensors)
    if not keys:
        return
    if kind == "extra_key":
        tensors[change[1]] = torch.ones(2, 2)
    else:
        key = keys[change[1] % len(keys)]
        t = tensors[key]
        if kind == "drop_key":
            del tensors[key]
        elif kind == "reshape":
            if change[2] == "T":
                tensors[key] = t.T.clone() if t.ndim == 2 else t.flatten()
            else:
                shape = list(t.shape)
                shape[0] = max(shape[0] + change[2], 1)
                tensors[key] = torch.zeros(shape, dtype=t.dtype)
        elif kind == "dtype":
            tensors[key] = t.float().to(change[2])
        elif kind == "nonfinite":
            t = t.clone().contiguous()
            t.view(-1)[0] = change[2]
            tensors[key] = t
    _save(path, tensors)


@settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(NAMES), changes=st.lists(mutation, min_size=1, max_size=2))
def test_mutated_checkpoint_loads_or_exits_2_with_one_line(name: str, changes: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / name
        shutil.copytree(SAMPLES / name, ckpt)
        cfg = json.loads((ckpt / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(BASE)
        (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
        for change in changes:
            mutate(ckpt, change)
        result = CliRunner().invoke(app, ["inspect", str(ckpt)])
        output = result.stdout + result.stderr
        assert "Traceback" not in output, output
        assert result.exit_code in (0, 2), (result.exit_code, output)
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
            return
        # Accepted: the reference must build and give finite logits (a mutation that only renames a hyper-
        # parameter, e.g. lora_alpha, is a different but valid adapter).
        loaded = moe_export.load(ckpt, task_id=None)
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
        assert torch.isfinite(logits).all()
