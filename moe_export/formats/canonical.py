"""The canonical layout (manifest.json + tensors.safetensors) as a loadable family."""

from __future__ import annotations

from typing import ClassVar

from moe_export.errors import FormatError
from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.registry import Family, LoadOptions, register
from moe_export.ir import MANIFEST_NAME, TENSORS_NAME, Adapter, check_weights


@register
class Canonical(Family):
    name: ClassVar[str] = "canonical"
    title: ClassVar[str] = "moe-export canonical"
    source: ClassVar[str] = "moe-export (manifest.json + tensors.safetensors)"
    specificity: ClassVar[int] = 100

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        return (
            ckpt.config_path is not None
            and ckpt.config_path.name == MANIFEST_NAME
            and ckpt.config_value("format") == "moe-export-canonical"
        )

    @classmethod
    def load(cls, ckpt: Checkpoint, options: LoadOptions, base: BaseWeights | None) -> Adapter:
        if ckpt.weights_path is None or ckpt.weights_path.name != TENSORS_NAME:
            raise FormatError(f"{ckpt.path}: canonical adapter without {TENSORS_NAME}")
        assert ckpt.config is not None
        check_weights(ckpt.tensors, str(ckpt.weights_path))
        adapter = Adapter.from_manifest(ckpt.config, dict(ckpt.tensors), where=str(ckpt.config_path))
        return adapter
