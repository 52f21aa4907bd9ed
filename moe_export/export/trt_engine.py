"""What building or running a TensorRT engine needs from the machine: the `tensorrt` module and a CUDA device.

Touched inside functions only, so this module imports on any machine. Running an engine is
runtimes/trt_engine.py's (EngineSession).
"""

from __future__ import annotations

from typing import Any

from moe_export.errors import RuntimeUnavailableError


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
