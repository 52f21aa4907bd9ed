"""The ONNX form of `moe_export::grouped_lora_slots`: a bare `GroupedLoRASlots` node and its function body.

    GroupedLoRASlots(x [T, D_in], expert_ids [T, K] int64, A [E_A, R, D_in], B [E, D_out, R]) -> y [T, K, D_out]
    y[t, k] = B[e] (A[e or 0] x[t]),  e = expert_ids[t, k]

The body is the exact dense decomposition of `ops.grouped_lora_slots_dense`: every expert's rank-R
projection of x, selected per slot by a one-hot mask, then one MatMul with the stacked B:
((x A_cat^T) * onehot(expert_ids)) B_cat. A row of `onnx_ops.custom_ops()`, like `GroupedLoRA`.
Legend: T tokens, K slots, E experts, E_A experts owning an A (E or 1), R rank.
"""

from __future__ import annotations

from typing import Any

from onnx import FunctionProto, helper

from moe_export.export.onnx_nodes import CustomOnnxOp, b_cat_nodes, const_ints, make_schema, node, shrink_all_nodes
from moe_export.ops.names import DOMAIN, GROUPED_LORA_SLOTS, PLUGIN_ATTRIBUTES

OP_NAME = GROUPED_LORA_SLOTS


def grouped_lora_slots_body(opset: int) -> FunctionProto:
    """Standard-op body; E_A = 1 needs no branch (h is [T, 1, 1, R] and broadcasts over K and E)."""
    nodes = [
        const_ints("minus1_1", [-1]),
        const_ints("axis_last", [-1]),
        node("Shape", ["x"], ["num_tokens"], end=1),  # [1] = T
        node("Shape", ["expert_ids"], ["num_slots"], start=1, end=2),  # [1] = K
        node("Shape", ["B"], ["num_experts"], end=1),  # [1] = E
        node("Shape", ["A"], ["experts_a"], end=1),  # [1] = E_A
        node("Shape", ["A"], ["rank"], start=1, end=2),  # [1] = R
        node("Shape", ["A"], ["d_in"], start=2, end=3),  # [1] = D_in
        node("Shape", ["B"], ["d_out"], start=1, end=2),  # [1] = D_out
        # h = x A_cat^T, viewed per expert: [T, 1, E_A, R]
        *shrink_all_nodes(),
        const_ints("one_1", [1]),
        # Explicit dims, no -1: with T = 0 a -1 could not be inferred from zero elements.
        node("Concat", ["num_tokens", "one_1", "experts_a", "rank"], ["h_shape"], axis=0),
        node("Reshape", ["h_flat", "h_shape"], ["h"]),  # [T, 1, E_A, R]
        # one-hot of each slot's expert: [T, K, E, 1] in x's type
        helper.make_node("Constant", [], ["zero_i"], value_int=0),
        helper.make_node("Constant", [], ["one_i"], value_int=1),
        node("Squeeze", ["num_experts"], ["num_experts_scalar"]),  # E
        node("Range", ["zero_i", "num_experts_scalar", "one_i"], ["experts"]),  # [E]
        node("Unsqueeze", ["expert_ids", "axis_last"], ["ids3"]),  # [T, K, 1]
        node("Equal", ["ids3", "experts"], ["onehot_bool"]),  # [T, K, E]
        node("CastLike", ["onehot_bool", "x"], ["onehot"]),  # [T, K, E]
        node("Unsqueeze", ["onehot", "axis_last"], ["onehot4"]),  # [T, K, E, 1]
        node("Mul", ["h", "onehot4"], ["hk"]),  # [T, K, E, R]
        node("Mul", ["num_experts", "rank"], ["experts_rank"]),  # [1] = E*R
        node("Concat", ["num_tokens", "num_slots", "experts_rank"], ["hk_flat_shape"], axis=0),
        node("Reshape", ["hk", "hk_flat_shape"], ["hk_flat"]),  # [T, K, E*R]
        *b_cat_nodes(),
        node("MatMul", ["hk_flat", "b_cat"], ["y"]),  # [T, K, D_out]
    ]
    return helper.make_function(
        DOMAIN,
        OP_NAME,
        ["x", "expert_ids", "A", "B"],
        ["y"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(PLUGIN_ATTRIBUTES),
    )


def grouped_lora_slots_row() -> tuple[Any, CustomOnnxOp]:
    """{torch op: CustomOnnxOp} row for `onnx_ops.custom_ops()`."""
    import torch

    import moe_export.ops.grouped_lora_slots  # noqa: F401  registers torch.ops.moe_export.grouped_lora_slots

    schema = make_schema(OP_NAME, [("x", "T"), ("expert_ids", "tensor(int64)"), ("A", "T"), ("B", "T")], [("y", "T")])
    return torch.ops.moe_export.grouped_lora_slots.default, CustomOnnxOp(OP_NAME, schema, grouped_lora_slots_body)
