"""Torch custom ops -> bare `moe_export::*` ONNX nodes, plus their model-local function bodies.

torch 2.13's dynamo exporter inlines every onnxscript function (docs/op-contract.md), so each
custom op is translated to a bare node over a hand-built `OpSchema`, and the body (standard ops only,
so any ONNX Runtime can run it; TensorRT prefers a plugin of the same name and namespace) is attached
to the saved model afterwards. One row of `custom_ops()` per op: MixLoRA's `GroupedLoRASlots` (onnx_slots.py) is a row.

Legend: T tokens, K slots per token, E experts, E_A experts owning an A (E or 1), R rank,
D_in / D_out feature sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
from onnx import FunctionProto, helper

from moe_export.export.onnx_nodes import (
    MAX_OPSET,
    MIN_OPSET,
    CustomOnnxOp,
    b_cat_nodes,
    const_ints,
    make_schema,
    node,
    shrink_all_nodes,
)
from moe_export.export.onnx_slots import grouped_lora_slots_row
from moe_export.ops.names import DOMAIN, GROUPED_LORA, PLUGIN_ATTRIBUTES


def _dense_gate_nodes() -> list[onnx.NodeProto]:
    """g [T, E] in x's type: the K (expert, gate) pairs scattered into a dense row (repeats add up).

    The scatter runs in fp32 and is cast afterwards: ORT's CPU ScatterElements has no fp16 kernel for
    reduction="add", and the gates come from an fp32 router anyway (fp16 -> fp32 -> fp16 is lossless).
    """
    return [
        node("Cast", ["gates"], ["gates_f32"], to=onnx.TensorProto.FLOAT),  # [T, K]
        node("Shape", ["x"], ["num_tokens"], end=1),  # [1] = T
        node("Shape", ["B"], ["num_experts"], end=1),  # [1] = E
        node("Concat", ["num_tokens", "num_experts"], ["gate_shape"], axis=0),
        helper.make_node("Constant", [], ["zero"], value_float=0.0),
        node("Expand", ["zero", "gate_shape"], ["gate_zeros"]),  # [T, E]
        node("ScatterElements", ["gate_zeros", "expert_ids", "gates_f32"], ["g_f32"], axis=1, reduction="add"),
        node("CastLike", ["g_f32", "x"], ["g"]),  # [T, E]
    ]


def grouped_lora_dense_body(opset: int) -> FunctionProto:
    """The exact dense decomposition ((x A_cat^T) * expand(g)) B_cat, as `ops.grouped_lora_dense`.

    E_A == 1 (one A shared by every expert) needs no branch: h is [T, 1, R] and broadcasts against
    g [T, E, 1]. The Reshape/Transpose of A and B act on initializers, so ONNX Runtime constant-folds
    them at session start; what runs per call is two MatMuls, a Mul and the gate scatter.
    """
    nodes = [
        *_dense_gate_nodes(),
        const_ints("minus1_1", [-1]),
        # Reshape: 0 keeps T, so these shapes fold to constants. No -1 next to T: with T = 0 it could not be
        # inferred from zero elements; the other dims come from A and B (initializers, so they fold too).
        const_ints("keep_t", [0]),
        const_ints("axis_last", [-1]),
        node("Shape", ["A"], ["experts_a"], end=1),  # [1] = E_A
        node("Shape", ["A"], ["rank"], start=1, end=2),  # [1] = R
        node("Shape", ["A"], ["d_in"], start=2, end=3),  # [1] = D_in
        *shrink_all_nodes(),
        node("Concat", ["keep_t", "experts_a", "rank"], ["h_shape"], axis=0),
        node("Reshape", ["h_flat", "h_shape"], ["h"]),  # [T, E_A, R]
        node("Unsqueeze", ["g", "axis_last"], ["g3"]),  # [T, E, 1]
        node("Mul", ["h", "g3"], ["hg"]),  # [T, E, R]
        # Flatten, not Reshape: ORT's optimizer rewrites a [T, E*R] Reshape target to [0, -1], which fails at T = 0.
        node("Flatten", ["hg"], ["hg_flat"], axis=1),  # [T, E*R]
        node("Shape", ["B"], ["d_out"], start=1, end=2),  # [1] = D_out
        *b_cat_nodes(),
        node("MatMul", ["hg_flat", "b_cat"], ["y"]),  # [T, D_out]
    ]
    return helper.make_function(
        DOMAIN,
        GROUPED_LORA,
        ["x", "expert_ids", "gates", "A", "B"],
        ["y"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(PLUGIN_ATTRIBUTES),
    )


def _grouped_lora_row() -> tuple[Any, CustomOnnxOp]:
    import torch

    import moe_export.ops.grouped_lora  # noqa: F401  registers torch.ops.moe_export.grouped_lora

    schema = make_schema(
        GROUPED_LORA,
        [("x", "T"), ("expert_ids", "tensor(int64)"), ("gates", "TG"), ("A", "T"), ("B", "T")],
        [("y", "T")],
    )
    return torch.ops.moe_export.grouped_lora.default, CustomOnnxOp(GROUPED_LORA, schema, grouped_lora_dense_body)


# Rows are built lazily (no torch/onnxscript work at import); add a builder here for a new op.
_ROW_BUILDERS: list[Callable[[], tuple[Any, CustomOnnxOp]]] = [_grouped_lora_row, grouped_lora_slots_row]


def custom_ops() -> dict[Any, CustomOnnxOp]:
    """The table {torch op overload: CustomOnnxOp}."""
    return dict(builder() for builder in _ROW_BUILDERS)


def translation_table() -> dict[Any, Callable[..., Any]]:
    """`custom_translation_table` for `torch.onnx.export`."""
    return {torch_op: row.translation() for torch_op, row in custom_ops().items()}


def function_bodies(op_types: set[str], opset: int) -> list[FunctionProto]:
    """The bodies (written in the model's standard opset) of the custom ops named in `op_types`."""
    return [row.body(opset) for row in custom_ops().values() if row.name in op_types]


__all__ = [
    "DOMAIN",
    "MAX_OPSET",
    "MIN_OPSET",
    "PLUGIN_ATTRIBUTES",
    "custom_ops",
    "function_bodies",
    "translation_table",
]
