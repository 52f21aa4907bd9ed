"""Native ONNX Runtime CPU kernels for the moe_export custom ops (C++ source shipped with the package).

`session_library()` is what ORT sessions call: the built library (built on first use when a compiler
and the ONNX Runtime headers are here) or None and why. `build()` / `status()` back `moe-export kernels`.
"""

from moe_export.runtimes.native.library import (
    KernelBuildError,
    KernelStatus,
    build,
    fetch_headers,
    kernel_calls,
    session_library,
    status,
)

__all__ = ["KernelBuildError", "KernelStatus", "build", "fetch_headers", "kernel_calls", "session_library", "status"]
