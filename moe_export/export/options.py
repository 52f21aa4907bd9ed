"""ExportOptions: the settings of `moe-export onnx` as data (config.py); `moe_export.export_onnx` takes them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moe_export.config import Options, fraction, help_text, one_of
from moe_export.errors import ExportError
from moe_export.export.manifest import DTYPES
from moe_export.export.onnx_nodes import MIN_OPSET
from moe_export.export.quantize import DEFAULT_BLOCK_SIZE, check_quantize_options
from moe_export.merging.options import CalibrateOptions, MergeOptions

DEFAULT_OPSET = 20
# Keyword arguments of moe_export.export_onnx before ExportOptions (still accepted, mapped onto `merge`).
LEGACY_MERGE_KEYS = {"merge_threshold": "threshold", "merge_budget": "budget"}


@dataclass(frozen=True)
class ExportOptions(Options):
    """What `moe-export onnx` writes and how; `merge` (optional) folds dominant experts first."""

    NESTED: ClassVar = {"merge": MergeOptions}

    dtype: str = field(default="fp32", metadata=help_text("fp32 | fp16 | bf16 (routers stay fp32)"))
    opset: int = field(default=DEFAULT_OPSET, metadata=help_text(f"standard ONNX opset (>= {MIN_OPSET})"))
    kv_cache: bool = field(default=True, metadata=help_text("the KV-cache decoder (False: the scoring graph)"))
    base_only: bool = field(default=False, metadata=help_text("export the base model without the adapter"))
    merge: MergeOptions | None = field(default=None, metadata=help_text("merge before exporting (None: no merge)"))
    quantize: str | None = field(default=None, metadata=help_text("int4 | int8 base weights (MatMulNBits), or None"))
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, metadata=help_text("quantization block size"))
    validate: bool = field(default=True, metadata=help_text("check parity against the PyTorch reference after"))
    max_top1_drop: float | None = field(
        default=None, metadata=help_text("with quantize: fail when more held-out argmaxes change than this share")
    )
    force: bool = field(default=False, metadata=help_text("replace an export that sits beside other files"))
    progress: bool = field(default=True, metadata=help_text("show progress on stderr"))

    def __post_init__(self) -> None:
        one_of(self.dtype, DTYPES, "--dtype")
        if self.opset < MIN_OPSET:
            raise ExportError(f"--opset {self.opset}: the GroupedLoRA function body needs opset >= {MIN_OPSET}")
        if self.base_only and self.merge is not None:
            raise ExportError("--base-only exports no adapter: it cannot be combined with a merge option")
        check_quantize_options(self.quantize, self.block_size, self.dtype)
        fraction(self.max_top1_drop, "--max-top1-drop")
        if self.max_top1_drop is not None and (self.quantize is None or not self.validate):
            raise ExportError(
                "--max-top1-drop gates a quantized export's validation: pass --quantize, not --no-validate"
            )

    @classmethod
    def build(cls, options: ExportOptions | None, fields: Mapping[str, Any]) -> ExportOptions:
        """`options`, or ExportOptions from keyword arguments (the API's older spelling included:
        merge_threshold / merge_budget / calibration_data become `merge`)."""
        if options is not None:
            if fields:
                raise ExportError(f"pass ExportOptions or keyword options, not both (got {sorted(fields)})")
            return options
        kept = dict(fields)
        merge = {new: kept.pop(old) for old, new in LEGACY_MERGE_KEYS.items() if kept.get(old) is not None}
        for old in LEGACY_MERGE_KEYS:
            kept.pop(old, None)
        data = kept.pop("calibration_data", None)
        if merge:
            calibration = CalibrateOptions(data=data, progress=kept.get("progress", True))
            kept["merge"] = MergeOptions(**merge, calibration=calibration)
        elif data is not None:
            raise ExportError("--data is calibration text for merging: pass --merge-threshold or --merge-budget too")
        unknown = sorted(set(kept) - set(cls.field_names()))
        if unknown:
            raise ExportError(f"export_onnx: unknown options {unknown}; known: {', '.join(cls.field_names())}")
        return cls(**kept)
