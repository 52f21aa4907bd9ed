"""Per-unit taps: what each routed unit saw and chose in one forward pass, captured by the runner that ran it.

A runner asked for taps (`Runner.request_taps()`) returns, with each `infer`, the inputs and output of every
routed unit it ran, keyed by the unit's node (or module) name:
- ONNX Runtime (any execution provider): the session is built over a copy of the model in which every
  routed unit's node's x, expert_ids, gates (inputs of GroupedLoRA(Slots/Add), outputs 1 and 2 of
  RoutedGroupedLoRA(Add), which route inside the node), output and, for the fused-residual forms, base input
  are extra graph outputs;
- torch: the reference modules' `record_routing` hook, with the router's fp32 probabilities.
Comparators (validation/) judge the taps; the runners only collect them.
Legend: T tokens, E experts, K slots, D_in / D_out feature sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from moe_export.errors import FormatError
from moe_export.ops.names import (
    DOMAIN,
    GATED_OP_TYPES,
    GROUPED_LORA,
    GROUPED_LORA_ADD,
    ROUTED_GROUPED_LORA_ADD,
    ROUTED_OP_TYPES,
    UNIT_OP_TYPES,
)


@dataclass
class UnitCapture:
    """What one routed unit (or one of its op nodes) saw and chose in one forward pass."""

    x: np.ndarray | None  # [T, D_in]
    expert_ids: np.ndarray  # [T, K] int64
    gates: np.ndarray | None  # [T, K]; None when the op takes no gates (GroupedLoRASlots)
    probs: np.ndarray | None = None  # [T, E] fp32 router probabilities (torch reference only)
    output: np.ndarray | None = None  # the op node's output ([T, D_out] GroupedLoRA, [T, K, D_out] slots)
    base: np.ndarray | None = None  # the fused-residual forms: base input [T, D_out] (output = base + delta)
    op_type: str = GROUPED_LORA

    def arrays(self) -> dict[str, np.ndarray]:
        """The array fields that are set, by field name (for saving)."""
        return {f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), np.ndarray)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], op_type: str) -> UnitCapture:
        known = {f.name for f in fields(cls)} - {"op_type"}
        unknown = sorted(set(arrays) - known)
        if unknown or "expert_ids" not in arrays:
            raise FormatError(
                f"a saved unit capture has fields {sorted(arrays)}; expected expert_ids and {sorted(known)}"
            )
        return cls(**{k: arrays.get(k) for k in known}, op_type=op_type)  # type: ignore[arg-type]


def numpy_of(t: Any) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()  # numpy has no bfloat16; widening is exact
    return t.cpu().numpy()


@contextmanager
def record_torch_routing(model: Any) -> Iterator[dict[str, UnitCapture]]:
    """Inside the block, every routed module of `model` records its own routing decision into the yielded dict
    (in execution order), with the router probabilities recomputed from the same x."""
    import torch

    from moe_export.reference.model import moe_modules
    from moe_export.reference.routing import router_probabilities

    captures: dict[str, UnitCapture] = {}
    modules = [(n, m) for n, m in moe_modules(model) if hasattr(m, "record_routing")]

    def make_hook(module: Any) -> Any:
        def hook(unit_name: str, flat_x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> None:
            probs = None
            router = getattr(module, "router", None)
            weight = getattr(module, "router_weight", None)
            if router is not None and weight is not None and router.kind == "linear":
                with torch.no_grad():
                    probs = numpy_of(router_probabilities(router, flat_x, weight, getattr(module, "router_bias", None)))
            # A unit called twice in one forward (not the case for Llama-style models) keeps its first call.
            captures.setdefault(unit_name, UnitCapture(numpy_of(flat_x), numpy_of(ids), numpy_of(gates), probs))

        return hook

    previous = [m.record_routing for _, m in modules]
    for _, module in modules:
        module.record_routing = make_hook(module)
    try:
        yield captures
    finally:
        for (_, module), hook in zip(modules, previous, strict=True):
            module.record_routing = hook


@dataclass
class NodeTaps:
    """The graph value names of one GroupedLoRA node (extra outputs of the tapped model)."""

    unit: str
    op_type: str
    x: str
    expert_ids: str
    gates: str | None
    output: str
    base: str | None = None  # the *Add forms: the base output the delta is added to


def grouped_lora_taps(model_proto: Any) -> list[NodeTaps]:
    """Every routed unit's node of the main graph, named by its unit (the node name, by the export contract).

    Where each value sits, by the op's schema (ops/names.py, docs/op-contract.md): GroupedLoRA(x, expert_ids,
    gates, A, B) and GroupedLoRAAdd(..., base); GroupedLoRASlots(x, expert_ids, A, B) has no gates;
    RoutedGroupedLoRA(x, router_weight, A, B) -> (y, expert_ids, gates) and RoutedGroupedLoRAAdd(..., base).
    """
    taps = []
    for i, node in enumerate(model_proto.graph.node):
        if node.domain != DOMAIN or node.op_type not in UNIT_OP_TYPES or len(node.input) < 4:
            continue
        unit = node.name or f"{node.op_type}_{i}"
        if node.op_type in ROUTED_OP_TYPES:
            ids, gates = node.output[1], node.output[2]
            base = node.input[4] if node.op_type == ROUTED_GROUPED_LORA_ADD else None
        else:
            ids, gates = node.input[1], node.input[2] if node.op_type in GATED_OP_TYPES else None
            base = node.input[5] if node.op_type == GROUPED_LORA_ADD else None
        taps.append(NodeTaps(unit, node.op_type, node.input[0], ids, gates, node.output[0], base))
    return taps


@dataclass
class TappedModel:
    """A serialized model with taps as extra outputs, its taps and its own (original) output names."""

    model: bytes
    taps: list[NodeTaps]
    outputs: list[str]


def tapped_model(onnx_path: Any) -> TappedModel:
    """The model (weights left on disk) with each GroupedLoRA node's inputs and output as graph outputs."""
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise FormatError(f"{onnx_path}: not a readable ONNX model ({exc})") from exc
    taps = grouped_lora_taps(proto)
    constants = {init.name for init in proto.graph.initializer} | {i.name for i in proto.graph.input}
    own_outputs = [o.name for o in proto.graph.output]
    existing = set(own_outputs)
    for tap in taps:
        for name in (tap.x, tap.expert_ids, tap.gates, tap.output, tap.base):
            # Initializers (e.g. constant task routing) and inputs cannot be outputs; they are read as is.
            if name is None or name in existing or name in constants:
                continue
            value = onnx.ValueInfoProto()
            value.name = name  # no type: ORT infers it
            proto.graph.output.append(value)
            existing.add(name)
    return TappedModel(proto.SerializeToString(), taps, own_outputs)


def captures_from_outputs(outputs: dict[str, np.ndarray], taps: list[NodeTaps]) -> dict[str, UnitCapture]:
    """Each node's tapped values, by node name (graph order); nodes with constant routing are left out."""
    captures: dict[str, UnitCapture] = {}
    for tap in taps:
        if tap.expert_ids not in outputs or (tap.gates is not None and tap.gates not in outputs):
            continue  # constant routing: nothing input dependent to compare
        output, base = outputs.get(tap.output), None if tap.base is None else outputs.get(tap.base)
        if base is not None and output is not None:  # the *Add forms: [..., D_out] in base's shape -> [T, D_out]
            output, base = (v.reshape(-1, v.shape[-1]) for v in (output, base))
        x = outputs.get(tap.x)  # the routed forms take x [..., D_in] (docs/op-contract.md): -> [T, D_in]
        captures[tap.unit] = UnitCapture(
            None if x is None else x.reshape(-1, x.shape[-1]),
            outputs[tap.expert_ids],
            None if tap.gates is None else outputs[tap.gates],
            output=output,
            base=base,
            op_type=tap.op_type,
        )
    return captures


def reorder_tokens(captures: dict[str, UnitCapture], order: np.ndarray) -> dict[str, UnitCapture]:
    """Each capture with its token rows put in `order` [B, S] (row b's position s takes its position order[b, s]).

    Every array field has T = B*S token rows first, or T*m (a slots node's [T*K] rows), token-major."""
    batch, seq = order.shape

    def reordered(v: np.ndarray) -> np.ndarray:
        assert v.shape[0] % (batch * seq) == 0, f"{v.shape[0]} rows are not per token of a {batch}x{seq} batch"
        rows = v.reshape(batch, seq, -1)  # [B, S, m * rest]
        return np.take_along_axis(rows, order[:, :, None], axis=1).reshape(v.shape)

    return {name: replace(c, **{k: reordered(v) for k, v in c.arrays().items()}) for name, c in captures.items()}


def node_index(node_name: str) -> int:
    """0 for a unit's first routed op node (named after the unit), n-1 for its n-th ("unit#n", export/onnx_graph.py)."""
    _, sep, count = node_name.rpartition("#")
    return int(count) - 1 if sep and count.isdigit() else 0


def match_unit(node_name: str, unit_names: set[str]) -> str | None:
    """The reference unit a node belongs to: its exact name (less a "#n" suffix), or the longest unit name that
    prefixes it."""
    if node_index(node_name):
        node_name = node_name.rpartition("#")[0]
    if node_name in unit_names:
        return node_name
    prefixes = [u for u in unit_names if node_name.startswith(u + ".") or node_name.startswith(u + "/")]
    return max(prefixes, key=len) if prefixes else None
