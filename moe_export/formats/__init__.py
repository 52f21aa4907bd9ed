"""Checkpoint families: one module per family, each registered in `registry.FAMILIES` on import."""

from moe_export.formats.registry import FAMILIES, Family, LoadOptions, detect_family, get_family, register

# Family modules register themselves; import them for that side effect. Keep this list sorted.
from moe_export.formats import canonical  # noqa: F401  isort: skip
from moe_export.formats import goat  # noqa: F401  isort: skip
from moe_export.formats import hydralora  # noqa: F401  isort: skip
from moe_export.formats import lora  # noqa: F401  isort: skip
from moe_export.formats import loramoe  # noqa: F401  isort: skip
from moe_export.formats import mixlora  # noqa: F401  isort: skip
from moe_export.formats import mmoelora  # noqa: F401  isort: skip
from moe_export.formats import moe_peft  # noqa: F401  isort: skip
from moe_export.formats import moelora  # noqa: F401  isort: skip
from moe_export.formats import mola  # noqa: F401  isort: skip

__all__ = ["FAMILIES", "Family", "LoadOptions", "detect_family", "get_family", "register"]
