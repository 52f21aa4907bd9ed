"""ExportOptions: the settings of `moe-export onnx` as data (config.py); `moe_export.export_onnx` takes them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from moe_export.config import Options, fraction, help_text, one_of
from moe_export.errors import ExportError
from moe_export.export.dtypes import DTYPES
from moe_export.export.onnx_nodes import MAX_OPSET, MIN_OPSET
from moe_export.export.quantize import DEFAULT_BLOCK_SIZE, check_quantize_options
from moe_export.merging.options import CalibrateOptions, MergeOptions

DEFAULT_OPSET = 20
# The KV-cache decoder's base graph (export/decoder_fused.py): ONNX Runtime contrib ops, or standard ops only.
FUSION_CONTRIB, FUSION_NONE = "contrib", "none"
FUSIONS = (FUSION_CONTRIB, FUSION_NONE)
# The default stays standard ops although contrib decodes faster on CPU (README, Measured) and validates like it
# (left-padded taps included): TensorRT has no GroupQueryAttention, so `moe-export trt` refuses a contrib export,
# and the documented flow onnx -> trt -> validate would break for everyone who exports with the defaults.
DEFAULT_FUSION = FUSION_NONE
# Keyword arguments of moe_export.export_onnx before ExportOptions (still accepted, mapped onto `merge`).
LEGACY_MERGE_KEYS = {"merge_threshold": "threshold", "merge_budget": "budget"}


@dataclass(frozen=True)
class ExportOptions(Options):
    """What `moe-export onnx` writes and how; `merge` (optional) folds dominant experts first."""

    NESTED: ClassVar = {"merge": MergeOptions}

    dtype: str = field(default="fp32", metadata=help_text("fp32 | fp16 | bf16 (routers stay fp32)"))
    opset: int = field(default=DEFAULT_OPSET, metadata=help_text(f"standard ONNX opset ({MIN_OPSET}..{MAX_OPSET})"))
    kv_cache: bool = field(default=True, metadata=help_text("the KV-cache decoder (False: the scoring graph)"))
    base_only: bool = field(default=False, metadata=help_text("export the base model without the adapter"))
    merge: MergeOptions | None = field(default=None, metadata=help_text("merge before exporting (None: no merge)"))
    quantize: str | None = field(default=None, metadata=help_text("int4 | int8 base weights (MatMulNBits), or None"))
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, metadata=help_text("quantization block size"))
    validate: bool = field(default=True, metadata=help_text("check parity against the PyTorch reference after"))
    max_top1_drop: float | None = field(
        default=None, metadata=help_text("with quantize: fail when more held-out argmaxes change than this share")
    )
    fusion: str = field(
        default=DEFAULT_FUSION,
        metadata=help_text(
            "none: standard ops only | contrib: the decoder's attention, rotary and residual norms as "
            "com.microsoft ops where the model allows it (ONNX Runtime only)"
        ),
    )
    adapter_fusion: bool = field(
        default=True,
        metadata=help_text(
            "fold each routed linear's residual Add and softmax top-k router into its node "
            "(RoutedGroupedLoRAAdd: export/onnx_routed.py); False keeps router, GroupedLoRA and Add apart"
        ),
    )
    force: bool = field(default=False, metadata=help_text("replace an export that sits beside other files"))
    progress: bool = field(default=True, metadata=help_text("show progress on stderr"))

    def __post_init__(self) -> None:
        one_of(self.dtype, DTYPES, "--dtype")
        one_of(self.fusion, FUSIONS, "--fusion")
        if self.opset < MIN_OPSET:
            raise ExportError(f"--opset {self.opset}: the GroupedLoRA function body needs opset >= {MIN_OPSET}")
        if self.opset > MAX_OPSET:
            raise ExportError(
                f"--opset {self.opset}: torch's ONNX exporter writes opsets {MIN_OPSET}..{MAX_OPSET}; pass one of those"
            )
        if self.base_only and self.merge is not None:
            raise ExportError("--base-only exports no adapter: it cannot be combined with a merge option")
        if self.validate and self.dtype == "bf16":
            # onnxruntime has no bfloat16 kernels for the exported graph on the CPU: the export would be written,
            # then its parity check would fail (exit 2) with the export left behind.
            raise ExportError(
                "--dtype bf16: onnxruntime cannot run a bf16 export on the CPU, so its parity cannot be checked; "
                "pass --no-validate to export it without the check"
            )
        check_quantize_options(self.quantize, self.block_size, self.dtype)
        fraction(self.max_top1_drop, "--max-top1-drop")
        if self.max_top1_drop is not None and (self.quantize is None or not self.validate):
            raise ExportError(
                "--max-top1-drop gates a quantized export's validation: pass --quantize, not --no-validate"
            )

    @property
    def calibration_data(self) -> str | None:
        """The merge's calibration text file (an input the export must not overwrite); None without one."""
        return self.merge.calibration.data if self.merge is not None else None

    @classmethod
    def build(cls, options: ExportOptions | None, fields: Mapping[str, Any]) -> ExportOptions:
        """`options`, or ExportOptions from keyword arguments (the API's older spelling included:
        merge_threshold / merge_budget / calibration_data become `merge`)."""
        if options is not None:
            if fields:
                raise ExportError(f"pass ExportOptions or keyword options, not both (got {sorted(fields)})")
            return options
        kept = dict(fields)
        legacy = {new: kept.pop(old, None) for old, new in LEGACY_MERGE_KEYS.items()}
        merge = merge_from_flags(**legacy, data=kept.pop("calibration_data", None), progress=kept.get("progress", True))
        if merge is not None:
            kept["merge"] = merge
        unknown = sorted(set(kept) - set(cls.field_names()))
        if unknown:
            raise ExportError(f"export_onnx: unknown options {unknown}; known: {', '.join(cls.field_names())}")
        return cls(**kept)


def merge_from_flags(
    threshold: float | None, budget: float | None, data: str | Path | None, *, device: str = "auto",
    forward: str = "auto", progress: bool = True,
) -> MergeOptions | None:  # fmt: skip
    """ExportOptions.merge from the flat merge flags of `moe-export onnx` (--merge-threshold, --merge-budget,
    --data, --device, --forward); None when neither a threshold nor a budget asks for a merge."""
    if threshold is None and budget is None:
        if data is not None:
            raise ExportError("--data is calibration text for merging: pass --merge-threshold or --merge-budget too")
        return None
    calibration = CalibrateOptions(data=data, device=device, forward=forward, progress=progress)
    return MergeOptions(threshold=threshold, budget=budget, calibration=calibration)
