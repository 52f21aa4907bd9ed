"""TensorRT Python plugin (QDP) `moe_export::GroupedLoRA`, AOT: the Triton kernel's PTX is baked into the engine.

Legend: T tokens, K slots per token, E experts, E_A experts owning an A (E or 1), R rank, D_in / D_out.

The ONNX parser binds our `GroupedLoRA` node to this plugin by op_type + the node's `plugin_namespace`
attribute (docs/op-contract.md, "TensorRT"); the node's other attributes are ignored because the plugin declares
none. Only `@trtp.aot_impl` is defined (no `@trtp.impl`), so TensorRT needs no network flag to choose
and the built engine runs without Python or Triton (trtexec can run it).

The tactics (ops/triton_grouped_lora.TACTICS) differ only in tiling, from decode-sized token tiles to
prefill tiles sharing one shrink across 1024 outputs; TensorRT times them at the profile's opt shape
and bakes the fastest into the engine.

No `from __future__ import annotations` here: tensorrt.plugin inspects the annotations as classes.
Import this module only when building with the plugin (it imports tensorrt and triton).
"""

from typing import List, Tuple, Union  # noqa: UP035 - tensorrt.plugin checks typing.get_origin(...) is tuple

import tensorrt as trt
import tensorrt.plugin as trtp

from moe_export.ops.names import DOMAIN, GROUPED_LORA, PLUGIN_VERSION
from moe_export.ops.triton_grouped_lora import SCALAR_ARGS, TACTICS, KernelConfig, choose_config, compile_ptx

PLUGIN_NAMESPACE = DOMAIN
PLUGIN_NAME = GROUPED_LORA
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"

_TRITON_TYPES = {
    trt.DataType.FLOAT: "fp32",
    trt.DataType.HALF: "fp16",
    trt.DataType.BF16: "bf16",
    trt.DataType.INT32: "i32",
    trt.DataType.INT64: "i64",
}
_TRT_TYPE_NAMES = {
    trt.DataType.FLOAT: "FP32",
    trt.DataType.HALF: "FP16",
    trt.DataType.BF16: "BF16",
    trt.DataType.INT32: "INT32",
    trt.DataType.INT64: "INT64",
}
# None: compile for the GPU that builds the engine. Tests set e.g. ("cuda", 90, 32) to compile without one.
AOT_TARGET: tuple[str, int, int] | None = None
_registered = False
_creator = None  # the registered creator, kept while it is out of the registry (set_plugin_enabled)


def _constant(expr: "trtp.ShapeExpr", what: str) -> int:
    if not expr.is_constant():
        raise ValueError(f"{PLUGIN_ID}: {what} must be known when the engine is built (A and B are weights)")
    return int(expr.constant_value())


def _triton_type(dtype: "trt.DataType", what: str) -> str:
    if dtype not in _TRITON_TYPES:
        raise ValueError(f"{PLUGIN_ID}: unsupported {what} dtype {dtype}")
    return _TRITON_TYPES[dtype]


def kernel_config(A: "trtp.TensorDesc", B: "trtp.TensorDesc", tactic: int) -> KernelConfig:
    """Tiles from the build-time constant weight shapes (A and B are initializers)."""
    num_experts = _constant(B.shape_expr[0], "E (B.shape[0])")
    rank = _constant(B.shape_expr[2], "R (B.shape[2])")
    d_in = _constant(A.shape_expr[2], "D_in (A.shape[2])")
    return choose_config(num_experts, rank, d_in, tactic=tactic if tactic in TACTICS else min(TACTICS))


def _aot_kernel(
    x: "trtp.TensorDesc",
    expert_ids: "trtp.TensorDesc",
    gates: "trtp.TensorDesc",
    A: "trtp.TensorDesc",
    B: "trtp.TensorDesc",
    tactic: int,
) -> Tuple[Union[str, bytes], Union[str, bytes], "trtp.KernelLaunchParams", "trtp.SymIntExprs"]:  # noqa: UP006,UP007
    """The AOT implementation: the Triton kernel compiled to PTX for `tactic`'s tiles, its launch grid and the
    scalar arguments (symbolic where the shape is dynamic)."""
    config = kernel_config(A, B, tactic)
    kernel = compile_ptx(
        _triton_type(x.dtype, "x"),
        _triton_type(expert_ids.dtype, "expert_ids"),
        _triton_type(gates.dtype, "gates"),
        config,
        target=AOT_TARGET,
    )
    num_tokens = x.shape_expr[0]  # symbolic: dynamic batch * sequence
    d_out = _constant(B.shape_expr[1], "D_out (B.shape[1])")
    scalars = {
        "num_tokens": num_tokens,
        "d_in": A.shape_expr[2],
        "d_out": B.shape_expr[1],
        "rank": B.shape_expr[2],
        "top_k": expert_ids.shape_expr[1],
        "num_experts": B.shape_expr[0],
        "shared_a": int(_constant(A.shape_expr[0], "E_A (A.shape[0])") == 1),
    }
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(scalars[name]) for name in SCALAR_ARGS])
    config = kernel.config  # tiles may have shrunk to fit shared memory
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(num_tokens, config.block_t)
    launch.grid_y = (d_out + config.outputs_per_program - 1) // config.outputs_per_program
    launch.block_x = kernel.num_warps * 32
    launch.shared_mem = kernel.shared_mem
    return kernel.name, kernel.ptx, launch, extra_args


def register_plugin() -> str:
    """Register the QDP once per process; returns the plugin id. Safe to call repeatedly."""
    global _registered
    if _registered:
        return PLUGIN_ID

    @trtp.register(PLUGIN_ID)
    def grouped_lora_desc(
        x: trtp.TensorDesc,
        expert_ids: trtp.TensorDesc,
        gates: trtp.TensorDesc,
        A: trtp.TensorDesc,
        B: trtp.TensorDesc,
    ) -> trtp.TensorDesc:
        # Strong typing: the output dtype is declared, equal to x's.
        return trtp.from_shape_expr((x.shape_expr[0], B.shape_expr[1]), dtype=x.dtype)  # [T, D_out]

    # The input types are declared once, above: TensorRT matches the autotune and aot_impl functions to the
    # registered schema by parameter name, and their input annotations are optional.
    @trtp.autotune(PLUGIN_ID)
    def grouped_lora_autotune(
        x,
        expert_ids,
        gates,
        A,
        B,
        outputs: Tuple[trtp.TensorDesc],  # noqa: UP006
    ) -> List[trtp.AutoTuneCombination]:  # noqa: UP006
        # The types are fixed by the (strongly typed) network; only the tile tactic is free.
        names = [_TRT_TYPE_NAMES.get(d.dtype, "FP32") for d in (x, expert_ids, gates, A, B, outputs[0])]
        return [trtp.AutoTuneCombination(", ".join(names), "LINEAR", list(TACTICS))]

    @trtp.aot_impl(PLUGIN_ID)
    def grouped_lora_aot(
        x,
        expert_ids,
        gates,
        A,
        B,
        outputs: Tuple[trtp.TensorDesc],  # noqa: UP006
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:  # noqa: UP006,UP007
        return _aot_kernel(x, expert_ids, gates, A, B, tactic)

    _registered = True
    return PLUGIN_ID


def set_plugin_enabled(enabled: bool) -> None:
    """Put the plugin creator into, or take it out of, TensorRT's registry (the parser then uses the body).

    `--plugin auto` builds both paths in one process, and QDP registration cannot be undone and redone,
    so the creator object is kept and re-registered instead.
    """
    global _creator
    registry = trt.get_plugin_registry()
    if enabled:
        register_plugin()
    current = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if current is not None:
        _creator = current
    if enabled and current is None and _creator is not None:
        registry.register_creator(_creator, PLUGIN_NAMESPACE)
    elif not enabled and current is not None:
        registry.deregister_creator(current)
