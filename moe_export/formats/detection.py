"""Find a family by name, or by what a checkpoint holds: `detect()` of every family, most specific wins."""

from __future__ import annotations

import re

from moe_export.errors import FormatError

# Family modules register themselves (decorators run at import); import them all here. Keep this list sorted.
from moe_export.formats import (  # noqa: F401
    canonical,
    goat,
    hydralora,
    lora,
    loramoe,
    mixlora,
    mmoelora,
    moe_peft,
    moelora,
    mola,
)
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.registry import FAMILIES, Family


def get_family(name: str) -> type[Family]:
    if name not in FAMILIES:
        raise FormatError(f"unknown family {name!r}; known families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def detect_family(ckpt: Checkpoint) -> type[Family]:
    """The most specific family whose detect() accepts the checkpoint; a clear error if none does."""
    matches = [f for f in FAMILIES.values() if f.detect(ckpt)]
    if not matches and ckpt.config is None:
        raise FormatError(
            f"{ckpt.path}: no adapter_config.json, so the family cannot be recognised; restore it, or pass --family NAME"
        )
    if not matches:
        keys = ckpt.keys() if ckpt.weights_path is not None else []
        shown = sorted({re.sub(r"\d+", "N", k) for k in keys})[:6]
        raise FormatError(
            f"{ckpt.path}: no known family matches (peft_type={ckpt.config_value('peft_type')!r}, "
            f"keys like {shown}); known families: {', '.join(sorted(FAMILIES))}; pass --family NAME or convert "
            "to the canonical layout"
        )
    matches.sort(key=lambda f: f.specificity, reverse=True)
    if len(matches) > 1 and matches[0].specificity == matches[1].specificity:
        names = ", ".join(f.name for f in matches)
        raise FormatError(f"{ckpt.path}: ambiguous layout, matches families {names}; pass --family NAME")
    return matches[0]
