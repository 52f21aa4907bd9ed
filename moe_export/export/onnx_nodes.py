"""Building blocks of the custom ops' ONNX form: the hand-built schema, node helpers, the op table row.

Shared by onnx_ops.py (GroupedLoRA, the table) and onnx_slots.py (GroupedLoRASlots).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import FunctionProto, helper

from moe_export.ops.names import DOMAIN, DOMAIN_VERSION, PLUGIN_ATTRIBUTES

# Oldest standard opset the bodies need (Shape start/end, ScatterElements reduction="add").
MIN_OPSET = 18
# Newest standard opset torch 2.13's exporter writes (torch.onnx._constants.ONNX_MAX_OPSET); an export at 23
# ran and passed validation in onnxruntime 1.32. Checked with the other options, before any model loads.
MAX_OPSET = 23
FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]

_FP = onnx.defs.OpSchema.FormalParameter


def make_schema(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]]) -> onnx.defs.OpSchema:
    return onnx.defs.OpSchema(
        name,
        DOMAIN,
        DOMAIN_VERSION,
        inputs=[_FP(n, t) for n, t in inputs],
        outputs=[_FP(n, t) for n, t in outputs],
        type_constraints=[("T", FLOAT_TYPES, "activations and weights"), ("TG", FLOAT_TYPES, "gates")],
        attributes=[
            onnx.defs.OpSchema.Attribute(attr, onnx.defs.OpSchema.AttrType.STRING, "TensorRT plugin lookup")
            for attr in PLUGIN_ATTRIBUTES
        ],
    )


def node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, **attrs)


def const_ints(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value_ints=values)


# The two matmuls every GroupedLoRA body shares (A [E_A, R, D_in], B [E, D_out, R]); both need the
# constant `minus1_1` ([-1]) and the [1]-shaped `d_in` / `d_out` already in the body.


def shrink_all_nodes() -> list[onnx.NodeProto]:
    """h_flat = x A_cat^T [T, E_A*R]: every token against every expert's A, as one MatMul."""
    return [
        node("Concat", ["minus1_1", "d_in"], ["a_cat_shape"], axis=0),
        node("Reshape", ["A", "a_cat_shape"], ["a_cat"]),  # [E_A*R, D_in]
        node("Transpose", ["a_cat"], ["a_cat_t"], perm=[1, 0]),  # [D_in, E_A*R]
        node("MatMul", ["x", "a_cat_t"], ["h_flat"]),  # [T, E_A*R]
    ]


def b_cat_nodes() -> list[onnx.NodeProto]:
    """b_cat [E*R, D_out]: B with its experts' ranks stacked, the right operand of the expand MatMul."""
    return [
        node("Transpose", ["B"], ["b_t"], perm=[0, 2, 1]),  # [E, R, D_out]
        node("Concat", ["minus1_1", "d_out"], ["b_cat_shape"], axis=0),
        node("Reshape", ["b_t", "b_cat_shape"], ["b_cat"]),  # [E*R, D_out]
    ]


@dataclass(frozen=True)
class CustomOnnxOp:
    """One torch custom op and its ONNX form: bare node name, schema, function body."""

    name: str  # ONNX op_type in domain moe_export (also the TensorRT plugin name)
    schema: onnx.defs.OpSchema
    body: Callable[[int], FunctionProto]  # standard opset -> FunctionProto

    def translation(self) -> Callable[..., Any]:
        """The exporter's translation: one bare node carrying the plugin attributes."""
        import onnxscript

        op = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION), self.name, self.schema)

        def translate(*inputs: Any) -> Any:
            return op(*inputs, **PLUGIN_ATTRIBUTES)

        return translate
