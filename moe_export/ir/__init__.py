"""The canonical adapter (docs/formats.md, "canonical"): units in `units.py`, the on-disk layout in `adapter.py`."""

from moe_export.ir.adapter import IR_VERSION, MANIFEST_NAME, TENSORS_NAME, Adapter
from moe_export.ir.units import (
    ExpertStack,
    FFNMoE,
    LinearMoE,
    Router,
    SharedLoRA,
    TaskGate,
    Unit,
    check_finite,
    check_weights,
    rank_scaling,
    short_unit_name,
)

__all__ = [
    "IR_VERSION",
    "MANIFEST_NAME",
    "TENSORS_NAME",
    "Adapter",
    "ExpertStack",
    "FFNMoE",
    "LinearMoE",
    "Router",
    "SharedLoRA",
    "TaskGate",
    "Unit",
    "check_finite",
    "check_weights",
    "rank_scaling",
    "short_unit_name",
]
