"""Parity and latency: compare runtimes against the PyTorch reference, benchmark against the base-only floor.

report = moe_export.validate("out/", runtimes=("torch", "onnxruntime"))
report.render(console); report.write_json("report.json"); report.write_junit("junit.xml")
assert report.passed
"""

from __future__ import annotations

from moe_export.lazy_api import lazy_exports

# Imported lazily so `import moe_export.validation` stays cheap (no torch / onnxruntime at import time).
__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "moe_export.validation.validate_artifact": ("validate", "DEFAULT_TOLERANCES"),
        "moe_export.validation.report": ("ValidationReport",),
        "moe_export.validation.parity": ("compare_func", "CompareResult", "Tolerance"),
        "moe_export.validation.bench": ("bench", "BenchReport"),
    },
)
