"""`moe-export onnx --quantize int4|int8`: base linears become MatMulNBits, the adapter stays fp32, and parity
is split into the export's arithmetic (vs the reference with the dequantized weights, fp32 tolerance) and the
quantization's cost (vs the fp32 reference, reported; gated with --max-top1-drop)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from moe_export.cli import app
from moe_export.export.manifest import ExportManifest
from moe_export.export.quantize import dequantize
from moe_export.ops.names import DOMAIN, ROUTED_OP_TYPES
from tests.artifacts import merged_sample_run, shared_cli_run
from tests.conftest import SAMPLES


@pytest.fixture(scope="module")
def int4_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The quick start's GOAT export with --quantize int4 (KV decoder, merge 0.9), validation included."""
    return shared_cli_run(
        tmp_path_factory,
        "int4-goat",
        lambda out: ["onnx", SAMPLES / "goat", "-o", out, "--merge-threshold", "0.9", "--quantize", "int4", "--json"],
    )


@pytest.fixture(scope="module")
def int8_qwen2_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """MixLoRA on Qwen2 (FFN experts, tied lm_head) as an int8 scoring graph, blocks of 16, validation included."""
    return shared_cli_run(
        tmp_path_factory,
        "int8-mixlora-qwen2",
        lambda out: [
            *("onnx", SAMPLES / "mixlora_qwen2", "-o", out, "--quantize", "int8", "--block-size", "16"),
            *("--no-kv-cache", "--json"),
        ],
    )


def _custom_parts(path: Path) -> tuple[list[bytes], list[bytes]]:
    proto = onnx.load(str(path), load_external_data=False)
    nodes = sorted(n.SerializeToString() for n in proto.graph.node if n.domain == DOMAIN)
    return nodes, sorted(f.SerializeToString() for f in proto.functions)


def test_int4_export_rewrites_only_base_linears(int4_run, tmp_path_factory: pytest.TempPathFactory) -> None:  # type: ignore[no-untyped-def]
    assert int4_run.exit_code == 0, int4_run.stderr[-2000:]
    out = int4_run.out_dir
    manifest = ExportManifest.load(out)
    scheme = manifest.quant_scheme
    assert scheme is not None and (scheme.scheme, scheme.bits, scheme.block_size, scheme.symmetric) == (
        "int4",
        4,
        32,
        True,
    )
    proto = onnx.load(str(out / "model.onnx"))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    # 2 layers x 7 projections (folded, merged and routed units' bases alike) + lm_head
    assert len(nbits) == 15 and sorted(n.name for n in nbits) == sorted(scheme.weights.values())
    assert "lm_head" in scheme.weights
    for node in nbits:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "com.microsoft" and attrs["accuracy_level"] == 4 and attrs["block_size"] == 32
    # What stays fp32: one router ([D, E] weight) per routed unit, inside its RoutedGroupedLoRAAdd node (input 1)
    # or, where the router pass left it in standard ops, a MatMul on an initializer.
    inits = {t.name: t for t in proto.graph.initializer}
    routers = [n.input[1] for n in proto.graph.node if n.op_type in ROUTED_OP_TYPES]
    routers += [n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    routed = len(manifest.routed_units)
    assert len(routers) == routed == 11
    assert all(inits[w].dims[-1] == 4 and inits[w].data_type == onnx.TensorProto.FLOAT for w in routers)
    # The GroupedLoRA nodes and their function bodies are byte-identical to the fp32 export's.
    fp32 = merged_sample_run(tmp_path_factory, SAMPLES / "goat")
    assert fp32.exit_code == 0
    assert _custom_parts(out / "model.onnx") == _custom_parts(fp32.out_dir / "model.onnx")
    # The model shrinks: int4 weights (the embedding table too) are 1/8 of fp32 plus a scale per 32.
    size = (out / "model.onnx").stat().st_size
    assert size < 0.75 * (fp32.out_dir / "model.onnx").stat().st_size


def test_int4_embedding_table(int4_run, tmp_path_factory: pytest.TempPathFactory) -> None:  # type: ignore[no-untyped-def]
    """The embedding table is int4 too (GatherBlockQuantized, the MatMulNBits blocks): what ORT gathers for
    every token id equals `dequantize` of the stored codes, and is within one quantization step of the fp32
    export's table (each block's largest-magnitude value exact); no fp32 table is left in the graph."""
    import onnxruntime as ort

    out = int4_run.out_dir
    scheme = ExportManifest.load(out).quant_scheme
    assert scheme is not None and list(scheme.embedding) == ["model.embed_tokens"]
    proto = onnx.load(str(out / "model.onnx"))
    (node,) = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert node.name == scheme.embedding["model.embed_tokens"]
    assert not any(
        n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].ndim == 2 for n in proto.graph.node
    )
    codes, scales = inits[node.input[0]], inits[node.input[2]]
    fp32 = onnx.load(str(merged_sample_run(tmp_path_factory, SAMPLES / "goat").out_dir / "model.onnx"))
    fp32_inits = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    (gather,) = [
        n
        for n in fp32.graph.node
        if n.op_type == "Gather" and n.input[0] in fp32_inits and fp32_inits[n.input[0]].ndim == 2
    ]
    table = fp32_inits[gather.input[0]]
    vocab, hidden = table.shape
    assert codes.shape == (vocab, hidden // 2) and codes.dtype == np.uint8 and gather.input[0] not in inits
    assert not any(v.shape == table.shape and v.dtype == np.float32 for v in inits.values())
    ids = np.arange(vocab, dtype=np.int64)[None]
    node.input[1] = "input_ids"  # in the export it reads the ids after the decoder's left-pad rotation
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, vocab])],
        [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(codes, node.input[0]), numpy_helper.from_array(scales, node.input[2])],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    )
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids}
    )[0][0]
    deq = dequantize(codes, scales, None, hidden, vocab, 4, scheme.block_size)
    np.testing.assert_array_equal(got, deq)
    step = np.repeat(np.abs(scales).reshape(vocab, -1), scheme.block_size, axis=1)
    assert (np.abs(deq - table) <= step * (1 + 1e-6)).all()
    blocks = np.abs(table).reshape(vocab, -1, scheme.block_size)
    largest = np.abs(deq).reshape(vocab, -1, scheme.block_size).max(-1)
    np.testing.assert_allclose(largest, blocks.max(-1), rtol=1e-6)


def test_int4_validation_split(int4_run) -> None:  # type: ignore[no-untyped-def]
    """The export's own check passed at the fp32 tolerance, and the cost was measured and reported."""
    data = json.loads(int4_run.stdout)
    report = data["validation"]
    assert report["passed"] and report["tolerance"] == {"atol": 1e-6, "rtol": 1e-4}
    cost = report["quantization"]
    assert cost["scheme"] == "int4" and cost["tokens"] > 100 and cost["max_top1_drop"] is None
    # int4 on random tiny weights moves logits by about a tenth: a real cost, not zero, not garbage.
    assert 0.01 < cost["logits_rel_error"] < 0.5 and 0.3 < cost["top1_agreement"] < 1.0
    assert cost["perplexity_reference"] > 1 and cost["perplexity_quantized"] > 1
    assert all(g["passed"] for g in report["generation"])


def test_dequantization_matches_onnxruntime(tmp_path: Path) -> None:
    """`dequantize` reads the quantizer's tensors as ORT's MatMulNBits computes them (level 0: fp32), and the
    values are what symmetric absmax quantization gives: the block's largest-magnitude weight exact (it maps to
    -2^(bits-1)), every other within one step (half a step by rounding, a full one where +2^(bits-1) clips)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from moe_export.runtimes.onnxruntime import OnnxRuntimeRunner

    rng = np.random.default_rng(0)
    k, n = 80, 24  # K not a multiple of the block: the last block is padded
    w = rng.normal(size=(k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    for bits in (4, 8):
        fresh = onnx.ModelProto()
        fresh.CopyFrom(model)  # the quantizer edits the proto it is given
        q = MatMulNBitsQuantizer(fresh, bits=bits, block_size=32, is_symmetric=True, accuracy_level=None)
        q.process()
        proto = q.model.model
        inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        (node,) = proto.graph.node
        deq = dequantize(inits[node.input[1]], inits[node.input[2]], None, k, n, bits, 32)  # [N, K]
        path = tmp_path / f"q{bits}.onnx"
        onnx.save(proto, str(path))
        x = rng.normal(size=(3, k)).astype(np.float32)
        with OnnxRuntimeRunner.from_path(path, native_kernels=False) as runner:
            got = runner.infer({"x": x})["y"]
        np.testing.assert_allclose(got, x @ deq.T, rtol=1e-5, atol=1e-5)
        levels = 2 ** (bits - 1)
        for start in range(0, k, 32):
            block, got_block = w[start : start + 32], deq.T[start : start + 32]  # [<=32, N]
            step = np.abs(block).max(0) / levels  # per column
            assert np.all(np.abs(got_block - block) <= step * (1 + 1e-5))
            peak = np.abs(block).argmax(0)
            np.testing.assert_allclose(got_block[peak, np.arange(n)], block[peak, np.arange(n)], rtol=1e-6)


def test_int8_scoring_graph_ffn_experts(int8_qwen2_run) -> None:  # type: ignore[no-untyped-def]
    assert int8_qwen2_run.exit_code == 0, int8_qwen2_run.stderr[-2000:]
    out = int8_qwen2_run.out_dir
    scheme = ExportManifest.load(out).quant_scheme
    assert scheme is not None and scheme.bits == 8 and scheme.block_size == 16
    # every base linear (MixLoRA's FFN bases included) and the tied lm_head; the embedding stays a Gather
    assert {"lm_head", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj"} <= set(scheme.weights)
    proto = onnx.load(str(out / "model.onnx"))
    assert any(n.op_type == "Gather" for n in proto.graph.node)
    data = json.loads(int8_qwen2_run.stdout)
    assert data["validation"]["passed"]
    # int8 costs far less than int4
    assert data["validation"]["quantization"]["top1_agreement"] > 0.9


def test_max_top1_drop_gate(int4_run) -> None:  # type: ignore[no-untyped-def]
    """The cost gate fails (exit 1) when asked for less drop than int4 gives, and passes with room."""
    out = str(int4_run.out_dir)
    agreement = json.loads(int4_run.stdout)["validation"]["quantization"]["top1_agreement"]
    result = CliRunner().invoke(app, ["validate", out, "--new-tokens", "0", "--max-top1-drop", "0"])
    assert result.exit_code == 1 and "top-1 drop" in result.output
    room = min(1.0, (1 - agreement) + 0.05)
    result = CliRunner().invoke(app, ["validate", out, "--new-tokens", "0", "--max-top1-drop", str(room)])
    assert result.exit_code == 0, result.output


def test_corrupted_expert_fails_both_sides(int4_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """(a) must catch a wrong expert on either side: in the export's graph, and in the checkpoint the
    reference is built from."""
    broken = tmp_path / "export"
    shutil.copytree(int4_run.out_dir, broken)
    proto = onnx.load(str(broken / "model.onnx"))
    node = next(n for n in proto.graph.node if n.domain == DOMAIN and n.op_type in ("GroupedLoRA", *ROUTED_OP_TYPES))
    b_input = node.input[3 if node.op_type in ROUTED_OP_TYPES else 4]  # B [E, D_out, R] (docs/op-contract.md)
    tensor = next(t for t in proto.graph.initializer if t.name == b_input)
    b = numpy_helper.to_array(tensor).copy()
    b[0] *= 3.0
    tensor.CopyFrom(numpy_helper.from_array(b, tensor.name))
    onnx.save(proto, str(broken / "model.onnx"))
    result = CliRunner().invoke(app, ["validate", str(broken), "--new-tokens", "0"])
    assert result.exit_code == 1, result.output

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(SAMPLES / "goat", ckpt)
    tensors = load_file(ckpt / "adapter_model.safetensors")
    for key in [k for k in tensors if ".lora_B." in k and "layers.0.self_attn.q_proj" in k]:
        tensors[key] = tensors[key] * 3
    save_file(tensors, ckpt / "adapter_model.safetensors")
    result = CliRunner().invoke(
        app,
        [
            "validate",
            str(int4_run.out_dir),
            "--new-tokens",
            "0",
            "--ckpt",
            str(ckpt),
            "--base",
            str(SAMPLES / "tiny-llama"),
        ],
    )
    assert result.exit_code == 1, result.output


def test_genai_and_ort_generate_the_same(int4_run) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime-genai runs the int4 export as it is and generates what our ORT loop does (same kernels)."""
    pytest.importorskip("onnxruntime_genai")
    tokens = {}
    for runtime in ("onnxruntime", "onnxruntime-genai"):
        args = ["generate", str(int4_run.out_dir), "--prompt-ids", "5,17,42,9", "--max-new-tokens", "8"]
        result = CliRunner().invoke(app, [*args, "--runtime", runtime, "--json"])
        assert result.exit_code == 0, result.output
        tokens[runtime] = json.loads(result.stdout)["tokens"]
    assert tokens["onnxruntime"] == tokens["onnxruntime-genai"] and len(tokens["onnxruntime"]) == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "int3"], "--quantize 'int3'"),
        (["--quantize", "int4", "--dtype", "fp16"], "needs --dtype fp32"),
        (["--quantize", "int4", "--block-size", "24"], "--block-size 24"),
        (["--max-top1-drop", "0.1"], "--max-top1-drop"),
        (["--quantize", "int4", "--max-top1-drop", "1.5"], "between 0 and 1"),
    ],
)
def test_bad_quantize_options(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["onnx", str(SAMPLES / "goat"), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_triton_repository(int4_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`moe-export triton` takes the int4 export: the decoder step and the generation model, the graph's I/O."""
    repo = tmp_path / "repo"
    result = CliRunner().invoke(
        app, ["triton", str(int4_run.out_dir), "-o", str(repo), "--name", "g4", "--backend", "python"]
    )
    assert result.exit_code == 0, result.output
    config = (repo / "g4" / "config.pbtxt").read_text()
    assert "past_key_values.0.key" in config and (repo / "g4_generate" / "config.pbtxt").is_file()
    assert (repo / "g4" / "1" / "model.onnx").is_file()


def test_max_top1_drop_needs_a_quantized_export(tmp_path_factory: pytest.TempPathFactory) -> None:
    """On an fp32 export the cost gate has nothing to gate: bad usage (exit 2), not a silent pass."""
    fp32 = merged_sample_run(tmp_path_factory, SAMPLES / "goat")
    result = CliRunner().invoke(app, ["validate", str(fp32.out_dir), "--max-top1-drop", "0.1"])
    assert result.exit_code == 2 and "not a quantized export" in result.output, result.output
