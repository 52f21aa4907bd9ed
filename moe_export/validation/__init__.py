"""Parity and latency: compare runtimes against the PyTorch reference, benchmark against the base-only floor.

report = moe_export.validate("out/", runtimes=("torch", "onnxruntime"))
report.render(console); report.write_json("report.json"); report.write_junit("junit.xml")
assert report.passed
"""

from __future__ import annotations

from typing import Any

# Imported lazily so `import moe_export.validation` stays cheap (no torch / onnxruntime at import time).
_API = {
    "validate": ("moe_export.validation.validate_artifact", "validate"),
    "DEFAULT_TOLERANCES": ("moe_export.validation.validate_artifact", "DEFAULT_TOLERANCES"),
    "ValidationReport": ("moe_export.validation.report", "ValidationReport"),
    "compare_func": ("moe_export.validation.parity", "compare_func"),
    "CompareResult": ("moe_export.validation.parity", "CompareResult"),
    "Tolerance": ("moe_export.validation.parity", "Tolerance"),
    "bench": ("moe_export.validation.bench", "bench"),
    "BenchReport": ("moe_export.validation.bench", "BenchReport"),
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'moe_export.validation' has no attribute {name!r}")
    import importlib

    module_name, attr = _API[name]
    return getattr(importlib.import_module(module_name), attr)
