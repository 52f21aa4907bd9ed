"""The view pass (export/onnx_routed.py: drop_token_views): a routed node reads the [..., D_in] tensor its x was
viewed from, only where the Reshape provably merges leading dims, and the graph computes the same bits.

One row per kind of Reshape before a routed node: what the graph declares (value info, the shape constant) decides
whether the pass may skip it; a view something else reads stays. Each graph runs in plain ONNX Runtime (the
function bodies) before and after the pass.
Legend: T tokens, E experts, K slots, R rank, D_in / D_out feature sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moe_export.export.onnx_ops import grouped_lora_dense_body
from moe_export.export.onnx_routed import drop_token_views, routed_body
from moe_export.ops.names import DOMAIN, GROUPED_LORA, PLUGIN_ATTRIBUTES, ROUTED_GROUPED_LORA

D_IN, D_OUT, E, R, K = 8, 4, 4, 2, 2
DIMS = {"batch": 2, "sequence": 3}  # the symbolic dims' values in the feeds
SHAPE = ["batch", "sequence", D_IN]  # x's shape where the row leaves it undeclared


@dataclass(frozen=True)
class Row:
    name: str
    source: list | None  # x's declared shape (value info) before the view (None: not declared)
    target: list | int | None  # the Reshape's shape: a constant (list), a computed [-1, last dim of x] (int), or None
    declared: list | None  # the view's declared shape (value info)
    removed: bool  # the pass skips the view and deletes it
    readers: int = 2  # routed nodes reading the view (q/k/v share one)
    other_reader: bool = False  # a GroupedLoRA node reads the view too (its contract keeps x [T, D_in])
    graph_output: bool = False  # the view is also a graph output


ROWS = [
    Row("merge-batch-sequence", ["batch", "sequence", D_IN], [-1, D_IN], ["batch*sequence", D_IN], True),
    Row("static-token-count", [2, 3, D_IN], [6, D_IN], None, True, readers=1),
    Row("rank-2-identity", ["T", D_IN], [-1, D_IN], None, True),
    Row("computed-shape-declared-2d", ["batch", "sequence", D_IN], D_IN, ["T", D_IN], True),
    Row("computed-shape-undeclared", ["batch", "sequence", D_IN], D_IN, None, False),
    Row("splits-rows", ["batch", "sequence", 2 * D_IN], [-1, D_IN], None, False),
    Row("source-undeclared", None, [-1, D_IN], ["T", D_IN], False),
    Row("source-last-dim-symbolic", ["batch", "sequence", "hidden"], [-1, D_IN], None, False),
    Row("copies-dim-0", ["batch", 1, D_IN], [0, D_IN], None, False),
    Row("read-by-grouped-lora", ["batch", "sequence", D_IN], [-1, D_IN], None, False, other_reader=True),
    Row("graph-output", ["batch", "sequence", D_IN], [-1, D_IN], None, False, graph_output=True),
]


def _view_nodes(row: Row) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """h -> x (an intermediate value, declared or not) -> Reshape -> view, its shape a constant or computed from
    x's shape."""
    nodes = [helper.make_node("Identity", ["h"], ["x"])]
    if isinstance(row.target, list):
        constant = numpy_helper.from_array(np.array(row.target, np.int64), "view_shape")
        return [*nodes, helper.make_node("Reshape", ["x", "view_shape"], ["view"])], [constant]
    nodes += [
        helper.make_node("Constant", [], ["minus_one"], value_ints=[-1]),
        helper.make_node("Shape", ["x"], ["last_dim"], start=-1),
        helper.make_node("Concat", ["minus_one", "last_dim"], ["view_shape"], axis=0),
        helper.make_node("Reshape", ["x", "view_shape"], ["view"]),
    ]
    return nodes, []


def _output(name: str) -> onnx.ValueInfoProto:
    """A graph output: y and z [T, D_out], ids (int64) and gates [T, K], view [T, D_in]."""
    last = {"y": D_OUT, "z": D_OUT, "i": K, "g": K, "v": D_IN}[name[0]]
    return helper.make_tensor_value_info(name, TensorProto.INT64 if name[0] == "i" else TensorProto.FLOAT, [None, last])


def view_model(row: Row) -> onnx.ModelProto:
    """h -> view -> `row.readers` RoutedGroupedLoRA nodes (and a GroupedLoRA on the first one's routing)."""
    rng = np.random.default_rng(0)
    weights = {
        "W": rng.standard_normal((D_IN, E)).astype(np.float32),
        "A": (rng.standard_normal((E, R, D_IN)) * 0.3).astype(np.float32),
        "B": (rng.standard_normal((E, D_OUT, R)) * 0.3).astype(np.float32),
    }
    nodes, constants = _view_nodes(row)
    outputs = ["view"] if row.graph_output else []
    for i in range(row.readers):
        names = [f"y{i}", f"ids{i}", f"gates{i}"]
        nodes.append(
            helper.make_node(
                ROUTED_GROUPED_LORA,
                ["view", "W", "A", "B"],
                names,
                name=f"unit{i}",
                domain=DOMAIN,
                k=K,
                normalize=1,
                **PLUGIN_ATTRIBUTES,
            )
        )
        outputs += names
    if row.other_reader:
        node = helper.make_node(GROUPED_LORA, ["view", "ids0", "gates0", "A", "B"], ["z"], domain=DOMAIN)
        nodes.append(node)
        outputs.append("z")
    shapes = {"x": row.source, "view": row.declared}
    declared = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items() if s is not None]
    graph = helper.make_graph(
        nodes, "views", [helper.make_tensor_value_info("h", TensorProto.FLOAT, row.source or SHAPE)],
        [_output(name) for name in outputs],
        initializer=[*constants, *(numpy_helper.from_array(v, k) for k, v in weights.items())], value_info=declared,
    )  # fmt: skip
    functions = [routed_body(ROUTED_GROUPED_LORA, 18), grouped_lora_dense_body(18)]
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=functions)


def run(model: onnx.ModelProto, h: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"h": h})


def feed(row: Row) -> np.ndarray:
    """h with the row's shape (symbolic dims at DIMS; an undeclared x as [batch, sequence, D_in])."""
    shape = row.source or SHAPE
    dims = [DIMS.get(d, D_IN) if isinstance(d, str) else d for d in shape]
    return np.random.default_rng(1).standard_normal(dims).astype(np.float32)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_a_view_goes_only_where_it_merges_leading_dims(row: Row) -> None:
    model = view_model(row)
    h = feed(row)
    want = run(model, h)
    assert drop_token_views(model) == int(row.removed)
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert len(reshapes) == (0 if row.removed else 1)
    routed = [n for n in model.graph.node if n.op_type == ROUTED_GROUPED_LORA]
    # every routed reader is rewired together (the shared q/k/v view), or none is
    rewired = row.removed or row.other_reader or row.graph_output
    assert [n.input[0] for n in routed] == ["x" if rewired else "view"] * row.readers
    assert all(n.input[0] == "view" for n in model.graph.node if n.op_type == GROUPED_LORA)
    if row.removed:  # the view's shape constant and value info went with it
        assert "view" not in {v.name for v in model.graph.value_info}
        assert "view_shape" not in {i.name for i in model.graph.initializer}
    onnx.checker.check_model(model, full_check=True)
    got = run(model, h)
    assert len(got) == len(want)
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape and np.array_equal(w, g)
    y = want[[o.name for o in model.graph.output].index("y0")]
    assert y.shape == (h.size // D_IN, D_OUT)  # [T, D_out], T the view's rows
