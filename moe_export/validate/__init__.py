"""Parity and latency: compare runtimes against the PyTorch reference, benchmark against the base-only floor.

report = moe_export.validate("out/", runtimes=("torch", "onnxruntime"))
report.render(console); report.write_json("report.json"); report.write_junit("junit.xml")
assert report.passed
"""

from __future__ import annotations

from typing import Any

# Imported lazily so `import moe_export.validate` stays cheap (no torch / onnxruntime at import time).
_API = {
    "validate": ("moe_export.validate.validation", "validate"),
    "DEFAULT_TOLERANCES": ("moe_export.validate.validation", "DEFAULT_TOLERANCES"),
    "ValidationReport": ("moe_export.validate.report", "ValidationReport"),
    "compare_func": ("moe_export.validate.parity", "compare_func"),
    "CompareResult": ("moe_export.validate.parity", "CompareResult"),
    "Tolerance": ("moe_export.validate.parity", "Tolerance"),
    "bench": ("moe_export.validate.bench", "bench"),
    "BenchReport": ("moe_export.validate.bench", "BenchReport"),
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'moe_export.validate' has no attribute {name!r}")
    import importlib

    module_name, attr = _API[name]
    return getattr(importlib.import_module(module_name), attr)
