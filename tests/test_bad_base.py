"""A base model whose config and weights disagree, or whose weight files are broken, is refused before any
model is built: one line naming the file (and the tensor), exit 2. Never a random-initialised weight, never
exit 3. Each case is a copy of samples/tiny-llama (or tiny-qwen2) changed one way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.errors import FormatError
from moe_export.reference.loading import load_base_model
from tests.conftest import SAMPLES


def copy_base(tmp_path: Path, name: str = "tiny-llama") -> Path:
    out = tmp_path / f"base-{name}"
    shutil.copytree(SAMPLES / name, out)
    return out


def edit_config(base: Path, **changes: object) -> None:
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(changes)
    (base / "config.json").write_text(json.dumps(cfg))


def edit_tensors(base: Path, change: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    path = base / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def shard(base: Path) -> dict:
    """Split model.safetensors into two shards and an index (the layout of any large hub model)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(base / "model.safetensors"))
    (base / "model.safetensors").unlink()
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(base / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def write_index(base: Path, index: object) -> None:
    (base / "model.safetensors.index.json").write_text(json.dumps(index))


def more_layers(base: Path) -> str:
    edit_config(base, num_hidden_layers=3)  # the weights hold 2: transformers would random-init layer 2
    return "num_hidden_layers is 3"


def fewer_layers(base: Path) -> str:
    edit_config(base, num_hidden_layers=1)  # layer 1 of the weights would be dropped
    return "num_hidden_layers is 1"


def hidden_size(base: Path) -> str:
    edit_config(base, hidden_size=96, head_dim=24)
    return "config.json builds it as"


def intermediate_size(base: Path) -> str:
    edit_config(base, intermediate_size=96)
    return "mlp.gate_proj.weight is [128, 64], config.json builds it as [96, 64]"


def untied_head_missing(base: Path) -> str:
    edit_tensors(base, lambda t: t.pop("lm_head.weight"))
    return "'lm_head.weight'"


def missing_norm(base: Path) -> str:
    edit_tensors(base, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    return "post_attention_layernorm"


def extra_tensor(base: Path) -> str:
    import torch

    edit_tensors(base, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2, 2)}))
    return "no place for"


def int_weights(base: Path) -> str:
    edit_tensors(base, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(__import__("torch").int32)}))
    return "stored as I32"


def tied_but_different(base: Path) -> str:
    edit_config(base, tie_word_embeddings=True)  # lm_head.weight differs from the embedding: one would be lost
    return "ties lm_head.weight to model.embed_tokens.weight"


def qwen2_bias_missing(base: Path) -> str:
    edit_tensors(base, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    return "k_proj.bias"


def truncated(base: Path) -> str:
    path = base / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "not a readable safetensors file"


def huge_header(base: Path) -> str:
    path = base / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    return "not a readable safetensors file"


def missing_shard(base: Path) -> str:
    shard(base)
    (base / "model-00002-of-00002.safetensors").unlink()
    return "shard 'model-00002-of-00002.safetensors'"


def weight_map_list(base: Path) -> str:
    index = shard(base)
    write_index(base, {"weight_map": list(index["weight_map"].items())})
    return "'weight_map' is list"


def index_top_level_list(base: Path) -> str:
    shard(base)
    write_index(base, [1, 2])
    return "expected a JSON object"


def index_escapes(base: Path) -> str:
    index = shard(base)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../victim.safetensors"
    write_index(base, index)
    return "outside"


def index_wrong_shard(base: Path) -> str:
    index = shard(base)
    key = next(k for k, v in index["weight_map"].items() if v.startswith("model-00001"))
    index["weight_map"][key] = "model-00002-of-00002.safetensors"
    write_index(base, index)
    return "whose header has no such tensor"


def truncated_shard(base: Path) -> str:
    shard(base)
    path = base / "model-00001-of-00002.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return "model-00001-of-00002.safetensors: not a readable safetensors file"


def config_unbuildable(base: Path) -> str:
    edit_config(base, num_attention_heads="four")
    return "config.json"


CASES: dict[str, tuple[str, Callable[[Path], str]]] = {
    "more-layers": ("tiny-llama", more_layers),
    "fewer-layers": ("tiny-llama", fewer_layers),
    "hidden-size": ("tiny-llama", hidden_size),
    "intermediate-size": ("tiny-llama", intermediate_size),
    "untied-head-missing": ("tiny-llama", untied_head_missing),
    "missing-norm": ("tiny-llama", missing_norm),
    "extra-tensor": ("tiny-llama", extra_tensor),
    "int-weights": ("tiny-llama", int_weights),
    "tied-but-different": ("tiny-llama", tied_but_different),
    "qwen2-bias-missing": ("tiny-qwen2", qwen2_bias_missing),
    "truncated": ("tiny-llama", truncated),
    "huge-header": ("tiny-llama", huge_header),
    "missing-shard": ("tiny-llama", missing_shard),
    "weight-map-list": ("tiny-llama", weight_map_list),
    "index-top-level-list": ("tiny-llama", index_top_level_list),
    "index-escapes": ("tiny-llama", index_escapes),
    "index-wrong-shard": ("tiny-llama", index_wrong_shard),
    "truncated-shard": ("tiny-llama", truncated_shard),
    "config-unbuildable": ("tiny-llama", config_unbuildable),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_base_is_one_line_exit_2(name: str, tmp_path: Path) -> None:
    sample, change = CASES[name]
    base = copy_base(tmp_path, sample)
    message = change(base)
    ckpt = "goat" if sample == "tiny-llama" else "mixlora_qwen2"
    result = CliRunner().invoke(app, ["inspect", str(SAMPLES / ckpt), "--base", str(base)])
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


def test_sharded_base_is_accepted(tmp_path: Path) -> None:
    """The control: the same weights, sharded correctly, load and give the single file's logits."""
    import torch

    base = copy_base(tmp_path)
    shard(base)
    result = CliRunner().invoke(app, ["inspect", str(SAMPLES / "goat"), "--base", str(base)])
    assert result.exit_code == 0, result.output
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        sharded = load_base_model(base)(input_ids=ids).logits
        single = load_base_model(SAMPLES / "tiny-llama")(input_ids=ids).logits
    assert torch.equal(sharded, single)


def test_onnx_with_a_lying_base_writes_nothing(tmp_path: Path) -> None:
    """The issue's case: a config with 3 layers over 2 layers' weights exported (exit 0) with random layer 2."""
    base = copy_base(tmp_path)
    more_layers(base)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["onnx", str(SAMPLES / "goat"), "--base", str(base), "-o", str(out), "--no-validate"]
    )
    assert result.exit_code == 2, result.output
    assert "num_hidden_layers is 3" in result.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base-tiny-llama"]


def test_load_report_refuses_random_initialised_weights(tmp_path: Path) -> None:
    """The last guard, for a base the header check does not see (a .bin base): transformers' own load report."""
    import torch

    base = copy_base(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(str(base / "model.safetensors"))
    tensors.pop("model.norm.weight")
    (base / "model.safetensors").unlink()
    torch.save(tensors, base / "pytorch_model.bin")
    with pytest.raises(FormatError, match=r"missing keys.*model\.norm\.weight"):
        load_base_model(base)
