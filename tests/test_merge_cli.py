"""`moe-export merge`: the streaming HF writer, plain-transformers loading, OUT/adapter, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import moe_export
from moe_export.cli import app
from moe_export.merging import calibrate, merge
from tests.conftest import SAMPLES
from tests.tiny import random_adapter, tiny_llama_config

runner = CliRunner()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def hf_model(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open is not a dict
    return out


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp" in p.name]


def test_task_fold_loads_in_plain_transformers(tmp_path) -> None:
    out = tmp_path / "merged"
    result = runner.invoke(
        app, ["merge", str(SAMPLES / "mmoelora"), "--task-id", "2", "--samples", "4", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report["top1_agreement"] == 1.0 and report["logits_rel_error"] < 1e-5
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "adapter" not in names  # every unit folded: nothing left routed
    reference = moe_export.load(SAMPLES / "mmoelora", task_id=2)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    unmerged = logits(reference.model, ids)
    merged = merge(reference, progress=False, evaluate=False).loaded.model
    plain = hf_model(out)
    assert torch.equal(logits(plain, ids), logits(merged, ids))  # the writer makes the same bits as the in-memory merge
    torch.testing.assert_close(logits(plain, ids), unmerged, rtol=1e-5, atol=1e-5)  # and the fold is exact


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama saved in several shards, and a canonical checkpoint over it."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(str(root / "base"), max_shard_size="20KB")
    adapter = random_adapter(seed=21)
    adapter.base_model = str(root / "base")
    return root / "base", adapter.save(root / "ckpt")


def test_streaming_writer_keeps_shards_and_routed_rest(tmp_path, sharded) -> None:
    base, ckpt = sharded
    stats = calibrate(moe_export.load(ckpt), samples=3, seq_len=8, progress=False)
    stats.save(tmp_path / "stats.json")
    out = tmp_path / "merged"
    # --stats + --no-eval: the streaming path, the reference model is never built.
    args = ["merge", str(ckpt), "--merge-threshold", "0.45", "--stats", str(tmp_path / "stats.json"), "--no-eval"]
    result = runner.invoke(app, [*args, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = "model.safetensors.index.json"
    assert json.loads((out / index).read_text()) == json.loads((base / index).read_text())

    expected = merge(moe_export.load(ckpt), threshold=0.45, stats=stats, progress=False, evaluate=False)
    assert expected.plan.merged_units and expected.loaded.adapter.units  # a partial merge
    assert json.loads(result.stdout)["plan"] == expected.plan.to_dict()
    folded = {f"{e.name}.weight" for e in expected.plan.units}
    written, original = tensors(out), tensors(base)
    state = expected.loaded.model.state_dict()
    for key, value in written.items():
        if key in folded:
            assert not torch.equal(value, original[key])
            assert torch.equal(value, state[key if key in state else key.replace(".weight", ".base.weight")])
        else:
            assert torch.equal(value, original[key])  # untouched tensors are copied byte for byte

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    want = logits(expected.loaded.model, ids)
    rest = moe_export.load(out / "adapter")  # canonical layout, base_model ".." = OUT
    assert rest.base_model_path == out.resolve()
    torch.testing.assert_close(logits(rest.model, ids), want, rtol=1e-5, atol=1e-6)

    if (Path(moe_export.__file__).parent / "export" / "onnx.py").is_file():
        import onnxruntime as ort

        onnx_dir = tmp_path / "onnx"
        # The scoring graph: this checks the merged weights, test_decoder.py the KV-cache decoder.
        moe_export.export_onnx(rest, onnx_dir, validate=False, progress=False, kv_cache=False)
        session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
        got = torch.from_numpy(session.run(["logits"], feeds)[0])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_input_exits_2_and_leaves_nothing(tmp_path, sharded, monkeypatch) -> None:
    base, ckpt = sharded
    out = tmp_path / "merged"
    cases = [
        (["--merge-threshold", "0.5", "--merge-budget", "1"], "exclude"),
        (["--merge-threshold", "2"], "threshold"),
        (["--merge-threshold", "0.5", "--stats", str(tmp_path / "none.json")], "none.json"),
        (["--merge-threshold", "0.5", "--data", str(tmp_path / "none.txt")], "none.txt"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["merge", str(ckpt), "-o", str(out), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and not out.exists() and no_leftovers(tmp_path)
    other = random_adapter(num_layers=1, num_experts=2, seed=3)
    other.base_model = str(base)
    other_stats = calibrate(moe_export.load(other.save(tmp_path / "other")), samples=1, seq_len=4, progress=False)
    other_stats.save(tmp_path / "other.json")
    args = ["--merge-budget", "1", "--stats", str(tmp_path / "other.json"), "--no-eval"]
    result = runner.invoke(app, ["merge", str(ckpt), "-o", str(out), *args])
    assert result.exit_code == 2 and "recalibrate" in result.output and not out.exists()

    out.mkdir()  # an existing empty directory (a mount point) is a fine -o (issue 23); one with a file is not
    (out / "mine.txt").write_text("mine")
    result = runner.invoke(app, ["merge", str(ckpt), "-o", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    shutil.rmtree(out)

    def broken(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("moe_export.merging.write._patch_shard", broken)
    result = runner.invoke(app, ["merge", str(ckpt), "-o", str(out), "--no-eval"])
    # Not a problem with the user's input: the CLI says so (exit 3) and leaves nothing behind.
    assert result.exit_code == 3 and "OSError: disk full" in result.output, result.output
    assert not out.exists() and no_leftovers(tmp_path)
