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
