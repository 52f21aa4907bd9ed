"""Capture per-unit routing (and the routed op's inputs/outputs) from the torch reference and from ONNX Runtime.

Torch: `MoELoRALinear.record_routing` is called with (unit_name, flat_x, expert_ids, gates); the router's
fp32 probabilities are recomputed from the same x so near-tie margins can be reported.
ONNX Runtime: an in-memory copy of the model exposes every `moe_export::GroupedLoRA` node's inputs
(x, expert_ids, gates) and output as extra graph outputs (a debug session; the parity numbers come from
the unmodified model).
Legend: T tokens, E experts, K slots, D_in / D_out feature sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_export.errors import FormatError
from moe_export.ops.names import DOMAIN, GROUPED_LORA, OP_TYPES
from moe_export.runtimes.base import Feeds


@dataclass
class UnitCapture:
    """What one routed unit saw and chose in one forward pass."""

    x: np.ndarray | None  # [T, D_in]
    expert_ids: np.ndarray  # [T, K] int64
    gates: np.ndarray | None  # [T, K]; None when the op takes no gates (GroupedLoRASlots)
    probs: np.ndarray | None = None  # [T, E] fp32 router probabilities (torch reference only)
    output: np.ndarray | None = None  # [T, D_out] routed delta (ONNX Runtime GroupedLoRA node output)
    op_type: str = GROUPED_LORA


def _numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()  # numpy has no bfloat16; widening is exact
    return t.cpu().numpy()


@contextmanager
def record_torch_routing(model: Any) -> Iterator[dict[str, UnitCapture]]:
    """Inside the block, every routed module of `model` records its routing into the yielded dict."""
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
                    probs = _numpy(router_probabilities(router, flat_x, weight, getattr(module, "router_bias", None)))
            # A unit called twice in one forward (not the case for Llama-style models) keeps its first call.
            captures.setdefault(unit_name, UnitCapture(_numpy(flat_x), _numpy(ids), _numpy(gates), probs))

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
    """The graph value names of one GroupedLoRA node (extra outputs of the debug model)."""

    unit: str
    op_type: str
    x: str
    expert_ids: str
    gates: str | None
    output: str


def grouped_lora_taps(model_proto: Any) -> list[NodeTaps]:
    """Every GroupedLoRA(Slots) node of the main graph, named by its unit (the node name, by the export contract).

    GroupedLoRA(x, expert_ids, gates, A, B); GroupedLoRASlots(x, expert_ids, A, B) has no gates input.
    """
    taps = []
    for i, node in enumerate(model_proto.graph.node):
        if node.domain != DOMAIN or node.op_type not in OP_TYPES or len(node.input) < 4:
            continue
        unit = node.name or f"{node.op_type}_{i}"
        gates = node.input[2] if node.op_type == GROUPED_LORA else None
        taps.append(NodeTaps(unit, node.op_type, node.input[0], node.input[1], gates, node.output[0]))
    return taps


def debug_model(onnx_path: Path) -> tuple[bytes, list[NodeTaps]]:
    """The model (weights left on disk) with each GroupedLoRA node's inputs and output as graph outputs."""
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise FormatError(f"{onnx_path}: not a readable ONNX model ({exc})") from exc
    taps = grouped_lora_taps(proto)
    constants = {init.name for init in proto.graph.initializer} | {i.name for i in proto.graph.input}
    existing = {o.name for o in proto.graph.output}
    for tap in taps:
        for name in (tap.x, tap.expert_ids, tap.gates, tap.output):
            # Initializers (e.g. constant task routing) and inputs cannot be outputs; they are read as is.
            if name is None or name in existing or name in constants:
                continue
            value = onnx.ValueInfoProto()
            value.name = name  # no type: ORT infers it
            proto.graph.output.append(value)
            existing.add(name)
    return proto.SerializeToString(), taps


def captures_from_outputs(outputs: dict[str, np.ndarray], taps: list[NodeTaps]) -> dict[str, UnitCapture]:
    """Pick each node's tapped values out of the debug session's outputs."""
    captures: dict[str, UnitCapture] = {}
    for tap in taps:
        if tap.expert_ids not in outputs or (tap.gates is not None and tap.gates not in outputs):
            continue  # constant routing: nothing input dependent to compare
        # Several nodes of one FFN unit share its routing: the first (in graph order) stands for the unit.
        captures.setdefault(
            tap.unit,
            UnitCapture(
                outputs.get(tap.x),
                outputs[tap.expert_ids],
                None if tap.gates is None else outputs[tap.gates],
                output=outputs.get(tap.output),
                op_type=tap.op_type,
            ),
        )
    return captures


def match_unit(node_name: str, unit_names: set[str]) -> str | None:
    """The reference unit a node belongs to: its exact name, or the longest unit name that prefixes it."""
    if node_name in unit_names:
        return node_name
    prefixes = [u for u in unit_names if node_name.startswith(u + ".") or node_name.startswith(u + "/")]
    return max(prefixes, key=len) if prefixes else None


def run_onnxruntime_debug(
    onnx_path: Path, feeds_list: list[Feeds], threads: int | None = None, providers: tuple[str, ...] = ("cpu",)
) -> list[dict[str, UnitCapture]]:
    """One capture dict per feed, from a debug session over an in-memory copy of the model."""
    from moe_export.runtimes.onnxruntime import OnnxRuntimeRunner, session_builder

    model_bytes, taps = debug_model(onnx_path)
    if not taps:
        return [{} for _ in feeds_list]
    build = session_builder(model_bytes, providers, threads, "all", external_data_dir=onnx_path.parent)
    with OnnxRuntimeRunner(build, name="onnxruntime-debug") as runner:
        return [captures_from_outputs(runner.infer(feeds), taps) for feeds in feeds_list]
