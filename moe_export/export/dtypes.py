"""The export dtypes in one place: their names (--dtype, export.json), and the torch dtype and the ONNX graph's
tensor type each one means. Plain strings at import time; torch is imported only by `torch_dtype`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("fp32", "fp16", "bf16")
GRAPH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # export dtype -> the graph's tensors


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an export dtype name (one of DTYPES, checked where the name was read)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
