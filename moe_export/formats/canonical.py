"""The canonical layout (manifest.json + tensors.safetensors) as a loadable family."""

from __future__ import annotations

from moe_export.errors import FormatError
from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.registry import Family, register
from moe_export.ir import MANIFEST_NAME, TENSORS_NAME, Adapter, check_weights


@register
class Canonical(Family):
    name = "canonical"
    title = "moe-export canonical"
    specificity = 100

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        return (
            ckpt.config_path is not None
            and ckpt.config_path.name == MANIFEST_NAME
            and ckpt.config_value("format") == "moe-export-canonical"
        )

    @classmethod
    def load(cls, ckpt: Checkpoint, base: BaseWeights | None) -> Adapter:
        if ckpt.weights_path is None or ckpt.weights_path.name != TENSORS_NAME:
            raise FormatError(f"{ckpt.path}: canonical adapter without {TENSORS_NAME}")
        assert ckpt.config is not None
        check_weights(ckpt.tensors, str(ckpt.weights_path))
        adapter = Adapter.from_manifest(ckpt.config, dict(ckpt.tensors), where=str(ckpt.config_path))
        return adapter
