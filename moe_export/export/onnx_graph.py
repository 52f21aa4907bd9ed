"""The traced program to a checked ONNX file: each moe_export node named after its unit, the function bodies
attached, saved (external data above the protobuf limit), the base and adapter graph passes, optional int4/int8
base weights, then onnx.checker and one gated node per routed linear unit. export/onnx.py runs it in its staging
directory; validation reads node names back with `unit_of_node`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_export.errors import ExportError
from moe_export.export.base_fusions import fuse_saved_model
from moe_export.export.manifest import UnitRecord
from moe_export.export.name_scopes import SCOPES_KEY, module_scopes
from moe_export.export.onnx_ops import function_bodies
from moe_export.export.onnx_routed import fuse_saved_adapter
from moe_export.export.options import ExportOptions
from moe_export.export.quantize import base_linear_names, quantize_saved_model
from moe_export.ops.names import DOMAIN, DOMAIN_VERSION, GATED_OP_TYPES, ROUTED_OP_TYPES

# A protobuf cannot exceed 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def post_process(
    program: Any, model: torch.nn.Module, model_path: Path, options: ExportOptions, units: list[UnitRecord], status: Any,
    packs: set[str],
) -> tuple[Path, Any, dict[str, Any] | None]:  # fmt: skip
    """Name each custom node after its unit, attach the function bodies, save (external data above the
    protobuf limit), fuse RMSNorm, fuse the adapter's routers and residual Adds into their nodes and drop the
    routed nodes' x views (unless `adapter_fusion` is off), quantize the base weights when asked (the `packs`,
    packed projections' linears, too), and check the saved file; returns its path, the quantization scheme
    (None: not quantized) and the adapter passes' record (None: no adapter)."""
    _name_custom_nodes(program.model, {u.name for u in units if u.status == "routed"})
    _attach_function_bodies(program.model, options.opset)
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    program.save(str(model_path), external_data=size > EXTERNAL_DATA_THRESHOLD)
    fuse_saved_model(model_path)  # RMSNorm as ORT fuses it (export/base_fusions.py), standard ops
    adapter_fusion = None
    if not options.base_only:
        counts = {"residual_adds": 0, "routers": 0, "views": 0}
        if options.adapter_fusion:
            counts = fuse_saved_adapter(model_path)  # export/onnx_routed.py
        adapter_fusion = {"requested": options.adapter_fusion, **counts}
    scheme = None
    if options.quantize is not None:
        status.update(f"quantizing the base weights ({options.quantize}, blocks of {options.block_size})")
        linears = base_linear_names(model) | packs
        scheme = quantize_saved_model(model_path, linears, options.quantize, options.block_size)
    status.update("checking the ONNX model")
    _check_saved(model_path, units)
    return model_path, scheme, adapter_fusion


def _unit_scope(node: Any, units: set[str]) -> str | None:
    """The unit whose module emitted `node`, from the exporter's name-scope metadata (deepest match)."""
    for name in reversed(module_scopes(node.metadata_props.get(SCOPES_KEY))):
        if name in units:
            return name
    return None


def _name_custom_nodes(model: Any, routed: set[str]) -> None:
    """Name every moe_export node after its unit so validate/trt can map nodes to units."""
    seen: dict[str, int] = {}
    for node in model.graph:
        if node.domain != DOMAIN:
            continue
        unit = _unit_scope(node, routed)
        if unit is None:
            raise ExportError(f"custom node {node.name} ({node.op_type}) cannot be mapped to an adapter unit")
        seen[unit] = seen.get(unit, 0) + 1
        node.name = unit if seen[unit] == 1 else f"{unit}{NODE_SUFFIX}{seen[unit]}"


LINEAR_UNIT_OP_TYPES = (*GATED_OP_TYPES, *ROUTED_OP_TYPES)
NODE_SUFFIX = "#"  # a unit's second, third... node (MixLoRA: one GroupedLoRASlots per gate/up/down projection)


def unit_of_node(name: str) -> str:
    """The adapter unit a moe_export node (as `_name_custom_nodes` named it) belongs to."""
    return name.split(NODE_SUFFIX, 1)[0]


def _attach_function_bodies(model: Any, opset: int) -> None:
    """Model-local functions for the custom ops used: plain ONNX Runtime refuses a node without one."""
    import onnx_ir

    used = {node.op_type for node in model.graph if node.domain == DOMAIN}
    for proto in function_bodies(used, opset):
        function = onnx_ir.serde.deserialize_function(proto)
        model.functions[function.identifier()] = function
    if used:
        model.opset_imports[DOMAIN] = DOMAIN_VERSION


def _check_saved(model_path: Path, units: list[UnitRecord]) -> None:
    """Full ONNX check, and exactly one GroupedLoRA node per routed linear unit."""
    import onnx

    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{model_path}: onnx.checker rejects the export: {str(exc).splitlines()[0][:300]}") from exc
    proto = onnx.load(str(model_path), load_external_data=False)
    # one gated node (GroupedLoRA, or its fused forms from export/onnx_routed.py) per routed linear unit
    names = [n.name for n in proto.graph.node if n.domain == DOMAIN and n.op_type in LINEAR_UNIT_OP_TYPES]
    want = sorted(u.name for u in units if u.status == "routed" and u.kind == "linear_moe")
    if sorted(names) != want:
        missing = sorted(set(want) - set(names))[:3]
        raise ExportError(
            f"{model_path}: {len(names)} GroupedLoRA nodes for {len(want)} routed units (missing {missing})"
        )


def custom_op_types(model_path: Path) -> list[str]:
    """The moe_export op types the saved graph holds (after the adapter passes)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return sorted({n.op_type for n in proto.graph.node if n.domain == DOMAIN})
