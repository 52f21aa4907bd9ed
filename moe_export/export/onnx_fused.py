"""Optional graph pass: GroupedLoRA -> Reshape -> Add(base, .) becomes one `GroupedLoRAAdd` node.

    GroupedLoRAAdd(x [T,D_in], expert_ids, gates, A, B, base [..., D_out]) -> base + reshape(GroupedLoRA(...))

The native kernel (moe_export/runtimes/native) writes base + delta in the pass that computes delta, which saves
the separate Add over the base output (in the unfused bench exports the residual Adds add 2.5-3.5%:
README.md, Measured).
The new op keeps a standard-op function body (GroupedLoRA's dense body, then Reshape to base's shape and
Add), so a plain ONNX Runtime still runs the rewritten file.
"""

from __future__ import annotations

import onnx
from onnx import FunctionProto, helper

from moe_export.export.graph_rewrite import GraphIndex, replace_nodes
from moe_export.export.onnx_ops import grouped_lora_dense_body
from moe_export.ops.names import DOMAIN, GROUPED_LORA, GROUPED_LORA_ADD, PLUGIN_ATTRIBUTES


def grouped_lora_add_body(opset: int) -> FunctionProto:
    dense = grouped_lora_dense_body(opset)
    nodes = []
    for node in dense.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.output[:] = ["delta" if name == "y" else name for name in copy.output]
        nodes.append(copy)
    nodes += [
        helper.make_node("Shape", ["base"], ["base_shape"]),
        helper.make_node("Reshape", ["delta", "base_shape"], ["delta_view"]),  # [T, D_out] -> base's shape
        helper.make_node("Add", ["base", "delta_view"], ["y"]),
    ]
    return helper.make_function(
        DOMAIN,
        GROUPED_LORA_ADD,
        [*dense.input, "base"],
        ["y"],
        nodes,
        list(dense.opset_import),
        attributes=list(PLUGIN_ATTRIBUTES),
    )


def fuse_residual_add(model: onnx.ModelProto) -> int:
    """Rewrite every GroupedLoRA -> Reshape -> Add whose intermediates have one consumer; returns the count."""
    graph = model.graph
    g = GraphIndex.of(graph)
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type != GROUPED_LORA:
            continue
        reshape = g.readers(node.output[0])
        if len(reshape) != 1 or reshape[0].op_type != "Reshape" or node.output[0] in g.outputs:
            continue
        add = g.readers(reshape[0].output[0])
        if len(add) != 1 or add[0].op_type != "Add" or reshape[0].output[0] in g.outputs:
            continue
        base = [name for name in add[0].input if name != reshape[0].output[0]]
        if len(base) != 1:
            continue
        fused = helper.make_node(
            GROUPED_LORA_ADD,
            [*node.input, base[0]],
            list(add[0].output),
            name=node.name,
            domain=DOMAIN,
            **PLUGIN_ATTRIBUTES,
        )
        replace[id(add[0])] = fused
        drop |= {id(node), id(reshape[0])}
    if not replace:
        return 0
    replace_nodes(graph, replace, drop)  # the fused node takes the Add's place
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if all(f.name != GROUPED_LORA_ADD for f in model.functions):
        model.functions.append(grouped_lora_add_body(opset))
    return len(replace)
