"""What building or running a TensorRT engine needs from the machine (the `tensorrt` module, a CUDA device), and
the binding check an engine applies to feeds (shared with the tests' CPU stand-in engine). Touched inside functions
only, so this module imports on any machine; running an engine is runtimes/trt_engine.py's (EngineSession).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from moe_export.errors import MoeExportError, RuntimeUnavailableError


def import_tensorrt() -> Any:
    """`import tensorrt`, or a one-line RuntimeUnavailableError saying how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"TensorRT is not installed ({exc}); on a CUDA machine: pip uninstall -y onnxruntime && "
            "pip install 'moe-export[gpu]' (README: GPU install)"
        ) from None
    return tensorrt


def require_cuda() -> str:
    """The CUDA device name, or a one-line RuntimeUnavailableError when there is no usable GPU."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailableError(
            "TensorRT needs an NVIDIA GPU, and torch sees no CUDA device "
            f"(torch {torch.__version__}; a +cpu build never has one); run on a GPU machine with a CUDA torch"
        )
    return torch.cuda.get_device_name()


ProfileRange = Callable[[str], tuple[tuple[int, ...], ...]]


def check_bindings(source: str, inputs: list[str], feeds: dict[str, np.ndarray], profile_range: ProfileRange) -> None:
    """What an engine refuses before any GPU work: a missing input, or a shape outside its profile (min..max).

    Shared with the CPU stand-in engine of the tests, so feed drift shows without a GPU."""
    missing = [n for n in inputs if n not in feeds]
    if missing:
        raise MoeExportError(f"{source}: missing inputs {missing}; got {sorted(feeds)}")
    for name in inputs:
        lo, _, hi = profile_range(name)
        shape = tuple(np.shape(feeds[name]))
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            raise MoeExportError(
                f"{source}: input {name} shape {shape} is outside the engine's profile [{tuple(lo)} .. {tuple(hi)}]; "
                "rebuild with `moe-export trt --min-shapes/--max-shapes`"
            )
