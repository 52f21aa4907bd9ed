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


def inspect_accepts(args: list[str]) -> bool:
    """Run `moe-export inspect`: True when it accepts the input (exit 0), False when it refuses it with exit 2
    and one line; anything else (a traceback, exit 1 or 3) fails the test."""
    result = CliRunner().invoke(app, args)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.exit_code in (0, 2), (result.exit_code, output)
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return result.exit_code == 0


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
        if not inspect_accepts(["inspect", str(ckpt)]):
            return
        # Accepted: the reference must build and give finite logits (a mutation that only renames a hyper-
        # parameter, e.g. lora_alpha, is a different but valid adapter).
        loaded = moe_export.load(ckpt, task_id=None)
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
        assert torch.isfinite(logits).all()


# Base models: config fields, the shard index and the safetensors headers, mutated on a sharded copy of
# samples/tiny-llama (two shards and an index, the layout of any large hub model).
BASE_CONFIG_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "model_type",
    "rms_norm_eps",
    "max_position_embeddings",
)
BASE_CONFIG_VALUES = st.sampled_from([-1, 0, 1, 2, 3, 16, 32, 64, 96, 128, 10**9, 0.5, "x", None, [], True, False])
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
base_mutation = st.one_of(
    st.tuples(st.just("config"), st.sampled_from(BASE_CONFIG_KEYS), BASE_CONFIG_VALUES),
    st.tuples(st.just("drop_config_key"), st.sampled_from(BASE_CONFIG_KEYS)),
    st.tuples(
        st.just("index"),
        st.sampled_from(["list", "weight_map_list", "weight_map_null", "empty_map", "no_map", "text"]),
    ),
    st.tuples(
        st.just("index_entry"),
        st.integers(0, 10_000),
        st.sampled_from(["missing.safetensors", "../escape.safetensors", "/etc/passwd", 3, None, *SHARDS]),
    ),
    st.tuples(st.just("drop_index_entry"), st.integers(0, 10_000)),
    st.tuples(st.just("delete_shard"), st.sampled_from(SHARDS)),
    st.tuples(st.just("truncate_shard"), st.sampled_from(SHARDS), st.floats(0.0, 0.99)),
    st.tuples(st.just("header_length"), st.sampled_from(SHARDS), st.sampled_from([0, 1, 7, 2**31, 2**62, 2**64 - 1])),
    st.tuples(st.just("header_byte"), st.sampled_from(SHARDS), st.integers(8, 200), st.integers(0, 255)),
    st.tuples(st.just("tensor"), st.integers(0, 10_000), st.sampled_from(["drop", "grow", "T", "int", "half"])),
)


def sharded_base(directory: Path) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(BASE, directory)
    tensors = read_tensor_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for shard, part in zip(SHARDS, (keys[::2], keys[1::2]), strict=True):
        save_file({k: tensors[k] for k in part}, str(directory / shard))
        weight_map.update({k: shard for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _mutate_index(base: Path, change: tuple) -> None:
    path = base / "model.safetensors.index.json"
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        keys = sorted(weight_map)
    except Exception:  # an earlier mutation broke the index: nothing more to mutate
        return
    if not isinstance(weight_map, dict) or not keys:
        return
    kind = change[0]
    if kind == "index":
        index = {
            "list": [index],
            "weight_map_list": {"weight_map": list(weight_map.items())},
            "weight_map_null": {"weight_map": None},
            "empty_map": {"weight_map": {}},
            "no_map": {"metadata": {}},
            "text": None,
        }[change[1]]
        if index is None:
            path.write_text("{not json")
            return
    elif kind == "index_entry":
        weight_map[keys[change[1] % len(keys)]] = change[2]
    elif kind == "drop_index_entry":
        del weight_map[keys[change[1] % len(keys)]]
    path.write_text(json.dumps(index))


def _mutate_shard_bytes(base: Path, change: tuple) -> None:
    path = base / change[1]
    if not path.is_file():
        return
    data = bytearray(path.read_bytes())
    if change[0] == "truncate_shard":
        data = data[: int(len(data) * change[2])]
    elif change[0] == "header_length":
        data[:8] = change[2].to_bytes(8, "little")
    elif len(data) > change[2]:
        data[change[2]] = change[3]
    path.write_bytes(bytes(data))


def _mutate_tensor(base: Path, change: tuple) -> None:
    from safetensors.torch import save_file

    shard = base / SHARDS[change[1] % 2]
    try:
        tensors = read_tensor_file(shard)
    except Exception:  # an earlier mutation broke the shard
        return
    keys = sorted(tensors)
    key = keys[change[1] % len(keys)]
    t = tensors[key]
    if change[2] == "drop":
        del tensors[key]
    elif change[2] == "grow":
        tensors[key] = torch.zeros([t.shape[0] + 1, *t.shape[1:]], dtype=t.dtype)
    elif change[2] == "T":
        tensors[key] = t.T.contiguous() if t.ndim == 2 else t.flatten()
    else:
        tensors[key] = t.to(torch.int32 if change[2] == "int" else torch.float16)
    save_file(tensors, str(shard))


def mutate_base(base: Path, change: tuple) -> None:
    kind = change[0]
    if kind in ("config", "drop_config_key"):
        config = base / "config.json"
        data = json.loads(config.read_text())
        if kind == "config":
            data[change[1]] = change[2]
        else:
            data.pop(change[1], None)
        config.write_text(json.dumps(data))
    elif kind in ("index", "index_entry", "drop_index_entry"):
        _mutate_index(base, change)
    elif kind == "delete_shard":
        (base / change[1]).unlink(missing_ok=True)
    elif kind in ("truncate_shard", "header_length", "header_byte"):
        _mutate_shard_bytes(base, change)
    else:
        _mutate_tensor(base, change)


def _base_examples() -> int:
    """12 in the suite; MOE_EXPORT_BASE_MUTATIONS=200 for a long run (the figure the README quotes)."""
    import os

    return int(os.environ.get("MOE_EXPORT_BASE_MUTATIONS", "12"))


@settings(max_examples=_base_examples(), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(changes=st.lists(base_mutation, min_size=1, max_size=2))
def test_mutated_base_loads_faithfully_or_exits_2_with_one_line(changes: list[tuple]) -> None:
    """Accepted means faithful: every weight the model runs with is the one the files hold (no random init)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = sharded_base(Path(tmp) / "base")
        for change in changes:
            mutate_base(base, change)
        if not inspect_accepts(["inspect", str(SAMPLES / "goat"), "--base", str(base)]):
            return
        from moe_export.formats.base_weights import BaseWeights
        from moe_export.reference.loading import load_base_model

        model = load_base_model(base)
        state = model.state_dict()
        weights = BaseWeights(base)
        for key in weights.key_to_file:
            assert torch.equal(state[key], weights.get(key).to(state[key].dtype)), key
        assert set(state) - set(weights.keys()) <= {"lm_head.weight"} and (
            "lm_head.weight" in weights or model.config.tie_word_embeddings
        )
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
        assert torch.isfinite(logits).all()
