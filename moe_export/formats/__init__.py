"""Checkpoint families: one module per family, each registered in `registry.FAMILIES` on import."""

from moe_export.formats.registry import FAMILIES, Family, LoadOptions, detect_family, get_family, register

# Family modules register themselves; import them for that side effect. Keep this list sorted.
from moe_export.formats import canonical  # noqa: E402,F401  isort: skip

__all__ = ["FAMILIES", "Family", "LoadOptions", "detect_family", "get_family", "register"]
