"""Checkpoint families: one module per family, each registered in `registry.FAMILIES` on import."""

from moe_export.formats.detection import detect_family, get_family
from moe_export.formats.registry import FAMILIES, Family, LoadOptions, register

__all__ = ["FAMILIES", "Family", "LoadOptions", "detect_family", "get_family", "register"]
