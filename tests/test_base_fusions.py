"""The RMSNorm rewrite (export/base_fusions.py): standard ops that ONNX Runtime fuses into one kernel per norm,
nothing else in the graph changed, the function bodies untouched."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from moe_export.export.base_fusions import divide_by_rms
from moe_export.ops.names import DOMAIN
from tests.artifacts import shared_export, tiny_base_dir


def _rms_norm_model() -> onnx.ModelProto:
    """transformers' RMSNorm as torch.onnx exports it, plus a Reciprocal that must stay (two users)."""
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["rstd"]),
        helper.make_node("Mul", ["x", "rstd"], ["normed"]),
        helper.make_node("Mul", ["w", "normed"], ["y"]),
        helper.make_node("Sqrt", ["x2"], ["s2"]),
        helper.make_node("Reciprocal", ["s2"], ["r2"]),
        helper.make_node("Mul", ["x2", "r2"], ["z"]),
    ]
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 3, 16]) for n in ("x", "x2")],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 3, 16]) for n in ("y", "z", "r2")],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _optimized_ops(model: onnx.ModelProto | str, tmp_path: Path) -> collections.Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def test_rewrite_same_values_and_ort_fuses_it(tmp_path: Path) -> None:
    model = _rms_norm_model()
    rng = np.random.default_rng(1)
    feeds = {"x": rng.normal(size=(2, 3, 16)).astype(np.float32), "x2": rng.random((2, 3, 16)).astype(np.float32) + 0.5}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert _optimized_ops(model, tmp_path)["SimplifiedLayerNormalization"] == 0  # ORT does not match the original
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    # The second Reciprocal is also a graph output (r2): it must stay.
    assert divide_by_rms(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    ops = collections.Counter(n.op_type for n in rewritten.graph.node)
    assert ops["Reciprocal"] == 1 and ops["Div"] == 1
    after = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    fused = _optimized_ops(rewritten, tmp_path)
    assert fused["SimplifiedLayerNormalization"] == 1 and fused["Pow"] == 0


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_export(tmp_path_factory, tiny_base_dir(tmp_path_factory))


def test_export_norms_fuse_in_ort(export_dir: Path, tmp_path: Path) -> None:
    """Every RMSNorm of the exported decoder (2 per layer + the final one) is one kernel in ORT."""
    proto = onnx.load(str(export_dir / "model.onnx"))
    layers = int(sum(1 for i in proto.graph.input if i.name.startswith("past_key_values.")) / 2)
    main_ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert main_ops["Reciprocal"] == 0
    # The function bodies still hold their own ops (not rewritten: they are not main-graph nodes).
    assert proto.functions and all(f.domain == DOMAIN for f in proto.functions)
    assert _optimized_ops(str(export_dir / "model.onnx"), tmp_path)["SimplifiedLayerNormalization"] == 2 * layers + 1
