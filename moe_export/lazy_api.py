"""Lazy public names for a package (PEP 562), so importing it stays cheap (no torch / onnx at import time)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, api: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], Any]]:
    """The public names of `api` ({module: names it defines}) and a module-level `__getattr__` that imports
    each name from its module on first use."""
    home = {name: module for module, names in api.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(home[name]), name)

    return list(home), __getattr__
