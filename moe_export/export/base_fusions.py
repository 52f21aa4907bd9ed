"""Standard-op rewrites of the exported base graph that let ONNX Runtime fuse it at session creation.

transformers' RMSNorm exports as Pow -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x) -> Mul(weight).
ORT's SimplifiedLayerNormFusion (the kernel onnxruntime-genai's builder writes directly) matches the same math
written with a Div: ... -> Sqrt -> Div(x, .) -> Mul(weight). Rewriting Reciprocal + Mul into that Div keeps the
graph in standard ops (TensorRT and any other runtime read it as before) and turns 7 kernels per norm into one
on ORT. x / s and x * (1 / s) differ by at most one rounding: well inside the fp32 parity tolerance.

The contrib decoder (export/decoder_fused.py) traces SkipSimplifiedLayerNormalization with all four outputs;
`drop_unused_norm_outputs` empties the mean / inv-std ones nothing reads.

Main-graph nodes only: the GroupedLoRA nodes and their model-local function bodies are not touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def divide_by_rms(proto: Any) -> int:
    """Rewrite every `Mul(x, Reciprocal(Sqrt(v)))` of the main graph into `Div(x, Sqrt(v))`, in place.

    Only when the Reciprocal feeds that one Mul and is not a graph output. Returns the number rewritten."""
    from onnx import helper

    from moe_export.export.graph_rewrite import GraphIndex, replace_nodes

    graph = proto.graph
    g = GraphIndex.of(graph)
    reciprocals: set[int] = set()
    divides: dict[int, Any] = {}  # id of the Mul -> the Div that replaces it (and its Reciprocal)
    for node in graph.node:
        sqrt = g.producer.get(node.input[0]) if node.op_type == "Reciprocal" and node.domain == "" else None
        if sqrt is None or sqrt.op_type != "Sqrt" or sqrt.domain != "" or node.output[0] in g.outputs:
            continue
        consumers = g.readers(node.output[0])
        if len(consumers) != 1 or consumers[0].op_type != "Mul" or consumers[0].domain != "":
            continue
        mul = consumers[0]
        if list(mul.input).count(node.output[0]) != 1:
            continue
        x = mul.input[0] if mul.input[1] == node.output[0] else mul.input[1]
        div = helper.make_node("Div", [x, node.input[0]], [mul.output[0]], name=f"{mul.name}_div_rms")
        div.metadata_props.extend(mul.metadata_props)
        divides[id(mul)] = div
        reciprocals.add(id(node))
    if not divides:
        return 0
    replace_nodes(graph, divides, reciprocals)  # the Div takes the Mul's place
    return len(divides)


def drop_unused_norm_outputs(proto: Any) -> int:
    """Empty SkipSimplifiedLayerNormalization's mean / inv-std outputs (1 and 2) that nothing reads, so ORT
    does not compute them and no declared shape has to match its own. In place; returns the outputs dropped."""
    used = {name for node in proto.graph.node for name in node.input} | {v.name for v in proto.graph.output}
    dropped: set[str] = set()
    for node in proto.graph.node:
        if node.domain != "com.microsoft" or node.op_type != "SkipSimplifiedLayerNormalization":
            continue
        for i in (1, 2):
            if i < len(node.output) and node.output[i] and node.output[i] not in used:
                dropped.add(node.output[i])
                node.output[i] = ""
    kept = [v for v in proto.graph.value_info if v.name not in dropped]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return len(dropped)


def fuse_saved_model(model_path: Path) -> int:
    """Apply the rewrites to a saved export (its weights, in external data or not, are not rewritten)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    count = divide_by_rms(proto) + drop_unused_norm_outputs(proto)
    if count:
        # Initializers keep their external_data references: only the graph proto is written again.
        onnx.save_model(proto, str(model_path))
    return count
