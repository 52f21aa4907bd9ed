"""Weight-only int4/int8 quantization of the base model's linears in a saved export (`onnx --quantize`).

Runs on the saved ONNX file, after the folds and the merge, so a folded or merged weight is quantized as the
base weight it has become. Only the MatMuls that implement a base `nn.Linear` of the traced model (every
projection, and lm_head as onnxruntime-genai's builder does) are rewritten into `com.microsoft::MatMulNBits`
by onnxruntime's own `MatMulNBitsQuantizer` (round to nearest, symmetric blocks along K). Routers, attention
MatMuls, the `GroupedLoRA` nodes and their model-local function bodies are not touched: the quantizer edits
main-graph nodes only, and routers are excluded by name (they are never an nn.Linear in our reference modules).

`accuracy_level` 4 (int8 activations) is the fast CPU kernel; level 0 computes in fp32 from the same
dequantized weights, which is what parity uses to check the export's arithmetic exactly (validation/).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import ExportError, FormatError
from moe_export.export.name_scopes import SCOPES_KEY, module_scopes

QUANTIZE_BITS = {"int4": 4, "int8": 8}
# MatMulNBits' CPU kernels take these block sizes (a power of two, >= 16).
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
FAST_ACCURACY_LEVEL = 4  # int8 activations: 3.6x faster than level 0 at one token (reference/quantization.md)
EXACT_ACCURACY_LEVEL = 0  # fp32 activations, the same dequantized weights
NBITS_OP = "MatMulNBits"
GATHER_OP = "GatherBlockQuantized"
MS_DOMAIN = "com.microsoft"
EMBEDDING_MODULE = "model.embed_tokens"  # transformers' decoder-only models name their input embedding so


@dataclass
class QuantScheme:
    """How an export's base weights were quantized: export.json's `quantization` record."""

    scheme: str = field(metadata={"help": "int4 | int8"})
    bits: int = field(metadata={"help": "weight bits"})
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, metadata={"help": "weights per scale, along K"})
    symmetric: bool = field(default=True, metadata={"help": "no zero-point tensor (zero point 2^(bits-1))"})
    accuracy_level: int = field(default=FAST_ACCURACY_LEVEL, metadata={"help": "MatMulNBits compute type"})
    op: str = field(default=f"{MS_DOMAIN}::{NBITS_OP}", metadata={"help": "the quantized op"})
    method: str = field(default="onnxruntime MatMulNBitsQuantizer, round to nearest", metadata={"help": "tool"})
    weights: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "module path of each quantized linear (or packed projection: fusion.packed) -> its node"},
    )
    embedding: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "int4: the embedding table's module -> its GatherBlockQuantized node (same blocks)"},
    )

    def __post_init__(self) -> None:
        if self.scheme not in QUANTIZE_BITS or QUANTIZE_BITS[self.scheme] != self.bits:
            raise FormatError(f"quantization: scheme {self.scheme!r} with {self.bits} bits is not one we write")
        if self.block_size not in BLOCK_SIZES:
            raise FormatError(f"quantization: block size {self.block_size} is not one of {BLOCK_SIZES}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_quantize_options(quantize: str | None, block_size: int, dtype: str) -> None:
    """The option checks, before any model loads (exit 2 on a bad value)."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_BITS:
        raise ExportError(f"--quantize {quantize!r}: expected one of {', '.join(QUANTIZE_BITS)}")
    if block_size not in BLOCK_SIZES:
        raise ExportError(f"--block-size {block_size}: expected one of {', '.join(map(str, BLOCK_SIZES))}")
    if dtype != "fp32":
        # MatMulNBits' fast CPU path takes fp32 activations; a fp16 graph around int4 weights is a GPU recipe
        # nobody asked for yet, and its parity story differs.
        raise ExportError(f"--quantize {quantize} needs --dtype fp32 (the activations stay fp32), not {dtype}")


def base_linear_names(model: Any) -> set[str]:
    """Module paths of the model's nn.Linear layers: the base projections (inside MoE modules too) and lm_head.

    Routers and experts are plain tensors in the reference modules, never nn.Linear, so they are not here."""
    import torch

    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _innermost_module(node: Any) -> str | None:
    """The deepest module scope of an exported node (onnx.NodeProto), without the export wrapper's prefix."""
    scopes = module_scopes(next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), None))
    return scopes[-2] if len(scopes) >= 2 else None  # the last entry names the op inside the module


def quantize_saved_model(model_path: Path, linears: set[str], quantize: str, block_size: int) -> QuantScheme:
    """Rewrite the base linears' MatMuls of `model_path` into MatMulNBits, in place (external data kept as
    the file had it). Returns the scheme with the module -> node map that validation dequantizes from."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    external = (model_path.parent / (model_path.name + ".data")).exists()
    proto = onnx.load(str(model_path))
    _gemms_to_matmuls(proto, linears)
    initializers = {t.name for t in proto.graph.initializer}
    chosen: dict[str, str] = {}
    excluded = []
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        module = _innermost_module(node)
        if module in linears and node.input[1] in initializers and module not in chosen:
            chosen[module] = node.name
        else:
            excluded.append(node.name)
    if not chosen:
        raise ExportError(f"{model_path}: --quantize found no base linear MatMul to quantize")
    bits = QUANTIZE_BITS[quantize]
    quantizer = MatMulNBitsQuantizer(
        proto,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=FAST_ACCURACY_LEVEL,
        nodes_to_exclude=excluded,
    )
    quantizer.process()
    out = quantizer.model.model
    nodes = {n.name: n for n in out.graph.node if n.op_type == NBITS_OP and n.domain == MS_DOMAIN}
    weights = {module: f"{name}_Q{bits}" for module, name in chosen.items()}
    missing = sorted(m for m, n in weights.items() if n not in nodes)
    if missing:
        raise ExportError(f"{model_path}: the quantizer left {len(missing)} base linears as MatMul, e.g. {missing[0]}")
    if len(nodes) != len(weights):
        raise ExportError(f"{model_path}: {len(nodes)} MatMulNBits nodes for {len(weights)} base linears")
    embedding = quantize_embedding(out, block_size) if bits == 4 else {}
    _save(out, model_path, external)
    return QuantScheme(scheme=quantize, bits=bits, block_size=block_size, weights=weights, embedding=embedding)


def quantize_embedding(proto: Any, block_size: int) -> dict[str, str]:
    """The embedding table's Gather -> `com.microsoft::GatherBlockQuantized` with int4 codes, in place.

    The same scheme as MatMulNBits (symmetric round to nearest, blocks of `block_size` along the hidden axis,
    zero point 8, one fp32 scale per block; onnxruntime-genai's builder writes this op for its int4 tied
    embeddings): the table is the largest fp32 tensor left after --quantize int4 (vocab x hidden). Skipped (the
    table stays fp32) when hidden is not a multiple of the block or the table is not a plain fp32 initializer.
    Returns {module: node} for export.json (empty when skipped)."""
    from onnx import TensorProto, helper, numpy_helper

    tensors = {t.name: t for t in proto.graph.initializer}
    users = [name for node in proto.graph.node for name in node.input]
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "Gather" or node.domain != "" or _innermost_module(node) != EMBEDDING_MODULE:
            continue
        table = tensors.get(node.input[0])
        if table is None or table.data_type != TensorProto.FLOAT or len(table.dims) != 2:
            return {}
        if table.dims[1] % block_size or any(a.name == "axis" and a.i != 0 for a in node.attribute):
            return {}
        codes, scales = quantize_blocks(numpy_helper.to_array(table), block_size)
        name = f"{node.name}_Q4"
        gather = helper.make_node(
            GATHER_OP,
            [f"{table.name}_Q4", node.input[1], f"{table.name}_scales"],
            list(node.output),
            name=name,
            domain=MS_DOMAIN,
            bits=4,
            block_size=block_size,
            gather_axis=0,
            quantize_axis=1,
        )
        gather.metadata_props.extend(node.metadata_props)
        proto.graph.node.remove(node)
        proto.graph.node.insert(index, gather)
        if users.count(table.name) == 1:  # a tied lm_head may still read the fp32 table
            proto.graph.initializer.remove(table)
        proto.graph.initializer.extend(
            [
                numpy_helper.from_array(codes, f"{table.name}_Q4"),
                numpy_helper.from_array(scales, f"{table.name}_scales"),
            ]
        )
        if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return {EMBEDDING_MODULE: name}
    return {}


def quantize_blocks(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[V, H] fp32 -> (uint8 codes [V, H/2], two per byte, low nibble first; fp32 scales [V, H/block]).

    Symmetric int4 as MLAS quantizes MatMulNBits weights: per block, the value of largest magnitude maps to code 0
    (scale = that value / -8, so the sign is in the scale), w ~ (code - 8) * scale, codes clipped to 0..15."""
    rows, hidden = table.shape
    blocks = table.reshape(rows, hidden // block_size, block_size).astype(np.float32)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], axis=-1)[..., 0]
    scales = np.where(extreme == 0, 1.0, extreme / -8.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scales[..., None]) + 8, 0, 15).astype(np.uint8)
    codes = (q[..., 0::2] | (q[..., 1::2] << 4)).reshape(rows, hidden // 2)
    return np.ascontiguousarray(codes), scales


def _gemms_to_matmuls(proto: Any, linears: set[str]) -> None:
    """A base linear on 2-D input exports as Gemm(x, W, transB=1) (MixLoRA's FFN bases do): the quantizer
    rewrites only MatMul, so such a Gemm becomes MatMul(x, W^T) (+ Add of its bias), in place."""
    from onnx import helper, numpy_helper

    tensors = {t.name: t for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if (
            node.op_type != "Gemm"
            or not plain
            or _innermost_module(node) not in linears
            or node.input[1] not in tensors
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(tensors[node.input[1]])
        name = node.input[1] + ("_T" if attrs.get("transB", 0) else "_K")
        proto.graph.initializer.append(
            numpy_helper.from_array(weight.T.copy() if attrs.get("transB", 0) else weight, name)
        )
        has_bias = len(node.input) > 2 and node.input[2]
        out = node.output[0] + "_nobias" if has_bias else node.output[0]
        matmul = helper.make_node("MatMul", [node.input[0], name], [out], name=node.name)
        matmul.metadata_props.extend(node.metadata_props)
        nodes.append(matmul)
        if has_bias:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _save(proto: Any, model_path: Path, external: bool) -> None:
    import onnx

    data = model_path.name + ".data"
    if external:
        (model_path.parent / data).unlink()  # rewritten whole below: the old offsets are stale
    onnx.save_model(proto, str(model_path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data)  # fmt: skip


def dequantized_weights(model_path: Path, scheme: QuantScheme) -> dict[str, np.ndarray]:
    """module path -> the [N, K] weight (nn.Linear layout) that the export's MatMulNBits node computes with,
    and the [vocab, hidden] table its GatherBlockQuantized embedding gathers from (int4).

    Read from the quantizer's own tensors: packed codes [N, blocks, block_size*bits/8] (low nibble first for
    4 bits), one fp32 scale per (column, block), zero point 2^(bits-1) when symmetric (no zero-point input)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model_path))
    tensors = {t.name: t for t in proto.graph.initializer}
    weights = {}
    gathers = {n.name: n for n in proto.graph.node if n.op_type == GATHER_OP}
    for module, node_name in scheme.embedding.items():
        node = gathers.get(node_name)
        if node is None:
            raise FormatError(f"{model_path}: no {GATHER_OP} node {node_name} (export.json names it for {module})")
        codes = numpy_helper.to_array(tensors[node.input[0]])
        scales = numpy_helper.to_array(tensors[node.input[2]]).astype(np.float32)
        rows, hidden = codes.shape[0], codes.shape[1] * 2
        weights[module] = dequantize(codes, scales, None, hidden, rows, 4, scheme.block_size)
    nodes = {n.name: n for n in proto.graph.node if n.op_type == NBITS_OP}
    for module, node_name in scheme.weights.items():
        node = nodes.get(node_name)
        if node is None:
            raise FormatError(f"{model_path}: no MatMulNBits node {node_name} (export.json names it for {module})")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        codes = numpy_helper.to_array(tensors[node.input[1]])
        scales = numpy_helper.to_array(tensors[node.input[2]]).astype(np.float32)
        zero = numpy_helper.to_array(tensors[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        weights[module] = dequantize(codes, scales, zero, int(attrs["K"]), int(attrs["N"]), int(attrs["bits"]),
                                     int(attrs["block_size"]))  # fmt: skip
    return weights


def dequantize(
    codes: np.ndarray, scales: np.ndarray, zero: np.ndarray | None, k: int, n: int, bits: int, block: int
) -> np.ndarray:
    """MatMulNBits' weight as an [N, K] fp32 matrix (see `dequantized_weights`)."""
    blocks = (k + block - 1) // block
    raw = codes.reshape(n, blocks, -1)
    if bits == 4:
        q = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(n, blocks, block)
    elif bits == 8:
        q = raw.reshape(n, blocks, block)
    else:
        raise FormatError(f"MatMulNBits with {bits} bits: only 4 and 8 are read")
    if zero is None:
        zp = np.full((n, blocks), 2 ** (bits - 1), dtype=np.float32)
    elif bits == 4:
        packed = zero.reshape(n, -1)
        zp = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    else:
        zp = zero.reshape(n, blocks).astype(np.float32)
    w = (q.astype(np.float32) - zp[:, :, None]) * scales.reshape(n, blocks)[:, :, None]
    return np.ascontiguousarray(w.reshape(n, blocks * block)[:, :k])


def with_accuracy_level(proto: Any, level: int) -> Any:
    """`proto` with every MatMulNBits node's accuracy_level set to `level` (0: fp32 compute); edited in place."""
    import onnx

    for node in proto.graph.node:
        if node.op_type != NBITS_OP or node.domain != MS_DOMAIN:
            continue
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept)
        if level:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    return proto
