"""The `moe-export` command line: a thin Typer layer over the library functions.

Each command lives in its own module in this package and registers itself on `app`.
Errors: a MoeExportError prints one line and exits with its code (2 bad input, 1 failed gate);
`--debug` shows the traceback instead.
"""

from __future__ import annotations

# Command modules register on `app` when imported, in the order `--help` lists them (the data flow).
from moe_export.cli import inspect_cmd  # noqa: F401  isort: skip
from moe_export.cli import calibrate_cmd  # noqa: F401  isort: skip
from moe_export.cli import merge_cmd  # noqa: F401  isort: skip
from moe_export.cli import onnx_cmd  # noqa: F401  isort: skip
from moe_export.cli import trt_cmd  # noqa: F401  isort: skip
from moe_export.cli import validate_cmd  # noqa: F401  isort: skip
from moe_export.cli import bench_cmd  # noqa: F401  isort: skip
from moe_export.cli import kernels_cmd  # noqa: F401  isort: skip
from moe_export.cli import generate_cmd  # noqa: F401  isort: skip
from moe_export.cli import triton_cmd  # noqa: F401  isort: skip
from moe_export.cli.app import app, main

__all__ = ["app", "main"]
