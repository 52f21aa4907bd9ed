"""moe-export: deploy mixture-of-LoRA-experts checkpoints (load, merge, ONNX, TensorRT, validate)."""

from __future__ import annotations

from moe_export.lazy_api import lazy_exports

__version__ = "0.1.0"

# The public API is imported lazily so `import moe_export` stays cheap (no torch/onnx at import time). The
# modules behind `merge`, `calibrate` and `validate` are named merging / validation so these names stay
# functions (an imported submodule would shadow them).
_names, __getattr__ = lazy_exports(
    __name__,
    {
        "moe_export.reference.loading": ("load", "LoadedAdapter"),
        "moe_export.ir": ("Adapter",),
        "moe_export.api": ("export_onnx",),
        "moe_export.merging": ("merge", "apply_merge_plan", "save_merged", "calibrate"),
        "moe_export.validation": ("validate", "bench"),
    },
)
__all__ = ["__version__", *_names]
