"""KV-cache decoder export: the I/O contract, the client files, the decode steps against a full forward,
generation parity in validate (and its failure on a broken KV path), onnxruntime-genai token for token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

import moe_export
from moe_export.cli import app
from moe_export.export.interface import position_ids
from moe_export.export.manifest import Artifact, ExportManifest
from moe_export.export.onnx_graph import LINEAR_UNIT_OP_TYPES
from moe_export.runtimes.decoding import Prompts, greedy_decode, torch_reference
from moe_export.runtimes.registry import make_runner
from moe_export.runtimes.torch_runner import reference_model_loader
from moe_export.validation.generation import default_prompts
from tests.artifacts import shared_export, shared_scoring_run
from tests.genai_check import assert_genai_matches_torch

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 8, 64  # tests/tiny.py's Llama (hidden 32, 4 heads)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    return shared_export(tmp_path_factory, tiny_base)


@pytest.fixture(scope="module")
def reference(export_dir: Path) -> torch.nn.Module:
    return reference_model_loader(Artifact.open(export_dir))().eval()


def _io(values: object) -> list[tuple[str, int, list[object]]]:
    return [
        (v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
        for v in values  # type: ignore[attr-defined]
    ]


def test_io_contract(export_dir: Path) -> None:
    """Names, order (keys and values interleaved per layer), dtypes, static kv_heads/head_dim, one node per unit."""
    model = onnx.load(str(export_dir / "model.onnx"))
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    past = [(f"past_key_values.{i}.{kv}", f32, ["batch", KV_HEADS, "past_sequence", HEAD_DIM])
            for i in range(LAYERS) for kv in ("key", "value")]  # fmt: skip
    present = [(f"present.{i}.{kv}", f32, ["batch", KV_HEADS, "total_sequence", HEAD_DIM])
               for i in range(LAYERS) for kv in ("key", "value")]  # fmt: skip
    assert _io(model.graph.input) == [
        ("input_ids", i64, ["batch", "sequence"]),
        ("attention_mask", i64, ["batch", "total_sequence"]),
        ("position_ids", i64, ["batch", "sequence"]),
        *past,
    ]
    assert _io(model.graph.output) == [("logits", f32, ["batch", "sequence", VOCAB]), *present]
    manifest = ExportManifest.load(export_dir)
    assert manifest.kv_cache
    nodes = sorted(n.name for n in model.graph.node if n.op_type in LINEAR_UNIT_OP_TYPES)
    assert nodes == sorted(u.name for u in manifest.routed_units) and len(nodes) == 14


def test_client_files(export_dir: Path) -> None:
    """genai_config.json holds only keys onnxruntime-genai knows (unknown keys are fatal there), with the
    model's real sizes; config.json and generation_config.json are there for optimum."""
    genai = json.loads((export_dir / "genai_config.json").read_text())
    config = json.loads((export_dir / "config.json").read_text())
    assert set(genai) == {"model", "search"}
    model = genai["model"]
    assert set(model) == {"type", "context_length", "vocab_size", "eos_token_id", "pad_token_id", "decoder"} | (
        {"bos_token_id"} if "bos_token_id" in model else set()
    )
    assert model["type"] == "decoder" and model["vocab_size"] == config["vocab_size"] == VOCAB
    assert model["context_length"] == config["max_position_embeddings"]
    decoder = model["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (
        LAYERS,
        KV_HEADS,
        HEAD_DIM,
    )
    assert decoder["filename"] == "model.onnx" and decoder["num_attention_heads"] == config["num_attention_heads"]
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert genai["search"]["past_present_share_buffer"] is False
    assert config["model_type"] == "llama"
    assert (export_dir / "generation_config.json").is_file()


def test_decode_steps_match_a_full_forward(export_dir: Path, reference: torch.nn.Module) -> None:
    """Independent of transformers' cache: every ONNX decode step (past 0, then one token at a time) gives
    the logits the reference computes on the whole sequence so far without a cache, for batch 1 and a
    right-padded batch (positions count attended tokens, the rule genai and optimum use)."""
    for prompts in default_prompts(VOCAB, pad_id=0, seed=3):
        with make_runner("onnxruntime", Artifact.open(export_dir)) as runner:
            got = greedy_decode(runner, ExportManifest.load(export_dir), prompts, new_tokens=5)
        ids = np.concatenate([prompts.input_ids, got.tokens], axis=1)
        mask = np.concatenate([prompts.attention_mask, np.ones_like(got.tokens)], axis=1)
        with torch.no_grad():
            full = reference(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(position_ids(mask)),
                use_cache=False,
            ).logits.numpy()
        width = prompts.input_ids.shape[1]
        last_real = prompts.attention_mask.sum(1) - 1
        for step in range(5):
            cols = last_real if step == 0 else np.full(len(ids), width + step - 1)
            want = full[np.arange(len(ids)), cols]
            err = np.abs(got.logits[step] - want).max()
            assert err <= 1e-4 * np.abs(want).max(), f"{prompts.label} step {step}: max abs {err:.3g}"
            assert (got.tokens[:, step] == want.argmax(-1)).all()


def test_validate_compares_generation(export_dir: Path) -> None:
    report = moe_export.validate(export_dir, shapes=[(1, 5)], new_tokens=6)
    assert report.passed, report.failures()
    labels = [(g.runtime, g.label) for g in report.generation]
    assert labels == [("onnxruntime", "1x7"), ("onnxruntime", "3x7 right-padded")]
    for g in report.generation:
        assert g.passed and g.reference_tokens == g.candidate_tokens and g.max_abs <= g.bound
        assert len(g.reference_tokens[0]) == 6


def _rewire_output(model: onnx.ModelProto, output: str, node: onnx.NodeProto) -> None:
    """Make graph output `output` the result of `node`, fed by what used to produce it (now `<output>.raw`,
    which the graph's own consumers, e.g. this layer's attention, keep reading)."""
    for existing in model.graph.node:
        for i, value in enumerate(existing.input):
            if value == output:
                existing.input[i] = output + ".raw"
        for i, value in enumerate(existing.output):
            if value == output:
                existing.output[i] = output + ".raw"
    model.graph.node.append(node)


def _rewire_input(model: onnx.ModelProto, name: str, nodes: list[onnx.NodeProto], new_name: str) -> None:
    """Every consumer of graph input `name` reads `new_name` (computed by `nodes`) instead."""
    for node in model.graph.node:
        for i, value in enumerate(node.input):
            if value == name:
                node.input[i] = new_name
    for node in reversed(nodes):
        model.graph.node.insert(0, node)


def _broken_copy(export_dir: Path, out: Path, edit: object) -> Path:
    shutil.copytree(export_dir, out)
    model = onnx.load(str(out / "model.onnx"))
    edit(model)  # type: ignore[operator]
    onnx.save_model(model, str(out / "model.onnx"))
    return out


def _corrupt_present(model: onnx.ModelProto) -> None:
    """Layer 1's cached values are scaled by 0.9: invisible at past 0, wrong from the first decode step."""
    scale = helper.make_tensor("corrupt_scale", TensorProto.FLOAT, [], [0.9])
    model.graph.initializer.append(scale)
    mul = helper.make_node("Mul", ["present.1.value.raw", "corrupt_scale"], ["present.1.value"], name="corrupt")
    _rewire_output(model, "present.1.value", mul)


def _forget_past_offset(model: onnx.ModelProto) -> None:
    """|positions - past length|: every step restarts near position 0 (a uniform offset would be invisible
    under rotary embeddings, which see only relative positions; Abs keeps a padded row's position in the
    contrib decoder's rotary cache range)."""
    nodes = [
        helper.make_node("Shape", ["past_key_values.0.key"], ["past_len"], start=2, end=3),
        helper.make_node("Sub", ["position_ids", "past_len"], ["position_ids.signed"]),
        helper.make_node("Abs", ["position_ids.signed"], ["position_ids.shifted"]),
    ]
    _rewire_input(model, "position_ids", nodes, "position_ids.shifted")


@pytest.mark.parametrize(
    ("edit", "unit"),
    [(_corrupt_present, "model.layers.1.self_attn.o_proj"), (_forget_past_offset, "model.layers.0.self_attn.o_proj")],
    ids=["present", "position"],
)
def test_validate_fails_on_a_broken_kv_path(export_dir: Path, tmp_path: Path, edit: object, unit: str) -> None:
    """The scoring comparison (past 0) passes, generation fails with exit 1, names step 1 and the first unit
    that sees a different input: the o_proj right after the broken attention."""
    broken = _broken_copy(export_dir, tmp_path / "broken", edit)
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["validate", str(broken), "--new-tokens", "4", "--report", str(report_path)])
    assert result.exit_code == 1, result.output
    assert "first bad step 1" in result.output
    data = json.loads(report_path.read_text())
    assert all(c["passed"] for c in data["comparisons"])  # the first step is right
    assert not data["passed"] and any(g["first_bad_step"] == 1 for g in data["generation"])
    assert all(f"first diverging unit {unit} " in g["message"] for g in data["generation"] if not g["passed"])


def test_scoring_graph_option(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """--no-kv-cache keeps the scoring graph; validate then compares logits only."""
    run = shared_scoring_run(tmp_path_factory, tiny_base)  # `onnx CKPT --no-kv-cache --json`, once per run
    assert run.exit_code == 0, run.stdout + run.stderr
    out = run.out_dir
    model = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert not ExportManifest.load(out).kv_cache and not (out / "genai_config.json").exists()
    validation = json.loads(run.stdout)["validation"]
    assert validation["passed"] and validation["comparisons"] and validation["generation"] == []


def test_genai_right_padded_batch(export_dir: Path, reference: torch.nn.Module) -> None:
    """onnxruntime-genai on a right-padded batch gives each row the reference's tokens."""
    pad = json.loads((export_dir / "genai_config.json").read_text())["model"]["pad_token_id"]
    for prompts in default_prompts(VOCAB, pad, seed=5):
        assert_genai_matches_torch(export_dir, reference, prompts)


def test_padded_row_generates_what_it_generates_alone(export_dir: Path, reference: torch.nn.Module) -> None:
    """The padded-batch reference (explicit-cache loop) agrees with transformers' `generate` on the row alone."""
    pad = json.loads((export_dir / "genai_config.json").read_text())["model"]["pad_token_id"]
    padded = default_prompts(VOCAB, pad, seed=6)[1]
    in_batch = torch_reference(reference, padded, 8, pad).tokens
    for row, length in enumerate(padded.attention_mask.sum(1)):
        alone = padded.input_ids[row : row + 1, :length]
        assert (torch_reference(reference, Prompts("alone", alone, np.ones_like(alone)), 8, pad).tokens[0]
                == in_batch[row]).all(), f"row {row}"  # fmt: skip


def test_tensorrt_profiles_cover_the_first_step(export_dir: Path) -> None:
    """TensorRT's default profile lets the past be empty, and its opt feeds are one consistent decode shape."""
    from moe_export.export.tensorrt import TrtBuildOptions, inspect_onnx_dir, opt_feeds, resolve_profiles

    info = inspect_onnx_dir(export_dir)
    profiles = resolve_profiles(info, TrtBuildOptions())
    lo, opt, hi = profiles["past_key_values.0.key"]
    assert lo[2] == 0 and lo[1] == opt[1] == hi[1] == KV_HEADS and lo[3] == hi[3] == HEAD_DIM
    feeds = opt_feeds(info, profiles)
    past, seq = feeds["past_key_values.1.value"].shape[2], feeds["input_ids"].shape[1]
    assert feeds["attention_mask"].shape[1] == past + seq and feeds["position_ids"].shape == feeds["input_ids"].shape
    assert hi[2] + profiles["input_ids"][2][1] <= profiles["attention_mask"][2][1]


def test_generate_command(export_dir: Path) -> None:
    """`moe-export generate` gives the same greedy tokens on every runtime; bad ids exit 2."""
    tokens = {}
    for runtime in ("torch", "onnxruntime", "onnxruntime-genai"):
        args = ["generate", str(export_dir), "--prompt-ids", "5,17,42", "--max-new-tokens", "6", "--runtime", runtime]
        result = CliRunner().invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["prompt_ids"] == [5, 17, 42] and data["tokens_per_second"] > 0
        tokens[runtime] = data["tokens"]
    assert tokens["torch"] == tokens["onnxruntime"] == tokens["onnxruntime-genai"] and tokens["torch"]
    result = CliRunner().invoke(app, ["generate", str(export_dir), "--prompt-ids", "5,999"])
    assert result.exit_code == 2 and "outside the vocabulary" in result.output
    result = CliRunner().invoke(app, ["generate", str(export_dir)])
    assert result.exit_code == 2 and "--prompt-ids" in result.output
