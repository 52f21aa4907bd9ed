"""moe-export: deploy mixture-of-LoRA-experts checkpoints (load, merge, ONNX, TensorRT, validate)."""

from __future__ import annotations

from moe_export.lazy_api import lazy_getattr

__version__ = "0.1.0"

# The public API is imported lazily; the modules behind `merge`, `calibrate` and `validate` are named
# merging / calibration / validation so these names stay functions (an imported submodule would shadow them).
# The public API is imported lazily so `import moe_export` stays cheap (no torch/onnx at import time).
_API = {
    "load": ("moe_export.reference.loading", "load"),
    "LoadedAdapter": ("moe_export.reference.loading", "LoadedAdapter"),
    "Adapter": ("moe_export.ir", "Adapter"),
    "export_onnx": ("moe_export.api", "export_onnx"),
    "merge": ("moe_export.merging", "merge"),
    "apply_merge_plan": ("moe_export.merging", "apply_merge_plan"),
    "save_merged": ("moe_export.merging", "save_merged"),
    "calibrate": ("moe_export.merging", "calibrate"),
    "validate": ("moe_export.validation", "validate"),
    "bench": ("moe_export.validation", "bench"),
}

__all__ = ["__version__", *_API]


__getattr__ = lazy_getattr(__name__, _API)
