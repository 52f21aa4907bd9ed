"""Lazy public names for a package (PEP 562), so importing it stays cheap (no torch / onnx at import time)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, api: dict[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module-level `__getattr__` that imports `api[name] = (module, attribute)` on first use."""

    def __getattr__(name: str) -> Any:
        if name not in api:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, attr = api[name]
        return getattr(importlib.import_module(module_name), attr)

    return __getattr__
