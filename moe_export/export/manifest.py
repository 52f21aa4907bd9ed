"""`export.json`: what an ONNX export holds and how it was made (read by validate, trt and bench)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moe_export.errors import FormatError
from moe_export.export.dtypes import DTYPES
from moe_export.export.interface import GraphInterface, TensorSpec
from moe_export.export.quantize import QuantScheme
from moe_export.files import check_field_types, known_fields, name_inside, read_json_object

MANIFEST_NAME = "export.json"
MANIFEST_FORMAT = "moe-export-onnx"
UNIT_STATUSES = ("routed", "folded", "merged")
LEGACY_KEYS = ("inputs", "outputs", "kv_cache")  # export.json before the interface object held these


@dataclass
class UnitRecord:
    """One adapter unit as exported."""

    name: str = field(metadata={"help": "HF module path, also the GroupedLoRA node name"})
    kind: str = field(metadata={"help": "linear_moe | ffn_moe"})
    status: str = field(metadata={"help": "routed (custom op), folded (only always-on LoRAs), merged (plan)"})
    num_experts: int | None = field(default=None, metadata={"help": "E"})
    top_k: int | None = field(default=None, metadata={"help": "k slots per token (E for dense)"})
    rank: int | None = field(default=None, metadata={"help": "R"})

    def __post_init__(self) -> None:
        check_field_types(self, f"unit {self.name!r}")
        if self.status not in UNIT_STATUSES:
            raise FormatError(f"unit {self.name}: status {self.status!r} is not one of {', '.join(UNIT_STATUSES)}")


@dataclass
class ExportManifest:
    """The export.json of an ONNX export directory."""

    moe_export_version: str = field(metadata={"help": "version that wrote the export"})
    source_checkpoint: str = field(metadata={"help": "absolute path of the checkpoint directory"})
    base_model: str = field(metadata={"help": "absolute path of the base model directory"})
    family: str = field(metadata={"help": "checkpoint family"})
    dtype: str = field(metadata={"help": "fp32 | fp16 | bf16 (routers stay fp32)"})
    opset: int = field(metadata={"help": "standard ONNX opset"})
    model_file: str = field(default="model.onnx", metadata={"help": "ONNX file name in the export directory"})
    external_data: str | None = field(default=None, metadata={"help": "external weights file name, or null"})
    base_only: bool = field(default=False, metadata={"help": "base model without the adapter"})
    load_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "top_k, task_id given to load"})
    units: list[UnitRecord] = field(default_factory=list, metadata={"help": "every adapter unit"})
    merge_plan: dict[str, Any] | None = field(default=None, metadata={"help": "MergePlan.to_dict(), or null"})
    interface: GraphInterface = field(
        default_factory=GraphInterface.scoring,
        metadata={"help": "the graph interface (export/interface.py): kind, inputs, outputs, past-KV layout"},
    )
    custom_ops: list[str] = field(default_factory=list, metadata={"help": "moe_export op types in the graph"})
    copied_files: list[str] = field(default_factory=list, metadata={"help": "config/tokenizer files copied"})
    quantization: dict[str, Any] | None = field(
        default=None, metadata={"help": "export/quantize.QuantScheme of the base weights, or null (not quantized)"}
    )
    fusion: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "decoder base-graph fusion: requested, mode (contrib | none), reason when not applied; "
            "contrib: packed, the projections packed into one MatMul (export/packing.py)"
        },
    )
    adapter_fusion: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "adapter graph passes (export/onnx_routed.py): requested, residual_adds and routers fused, "
            "views (Reshapes to [T, D_in] before routed nodes) dropped; null in exports written before them"
        },
    )
    format: str = field(default=MANIFEST_FORMAT, metadata={"help": "always moe-export-onnx"})
    relative_sources: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "source_checkpoint/base_model relative to the export, used when the absolute ones moved"},
    )

    def __post_init__(self) -> None:
        check_field_types(self, "export manifest")
        # File names the export directory holds; read back by validate/bench/trt/triton and deleted by a later
        # `onnx --force`: none may leave the directory. (relative_sources point at the sources beside the export
        # on purpose: they are only read, and --ckpt/--base may name any directory anyway.)
        for key, names in (
            ("model_file", [self.model_file]),
            ("external_data", [self.external_data] if self.external_data else []),
            ("copied_files", self.copied_files),
        ):
            for name in names:
                name_inside("the export directory", name, f"export manifest: {key}")
        if self.dtype not in DTYPES:
            raise FormatError(f"export manifest: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.format != MANIFEST_FORMAT:
            raise FormatError(f"export manifest: format {self.format!r}, expected {MANIFEST_FORMAT!r}")

    @property
    def quant_scheme(self) -> QuantScheme | None:
        """The base weights' quantization (None: fp32/fp16/bf16 weights as `dtype` says)."""
        if self.quantization is None:
            return None
        try:
            return QuantScheme(**known_fields(QuantScheme, self.quantization, MANIFEST_NAME))
        except TypeError as exc:
            raise FormatError(f"{MANIFEST_NAME}: quantization record unreadable ({exc})") from exc

    @property
    def routed_units(self) -> list[UnitRecord]:
        return [u for u in self.units if u.status == "routed"]

    @property
    def kv_cache(self) -> bool:
        """A KV-cache decoder (export/decoder.py), not the scoring graph."""
        return self.interface.is_decoder

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.interface.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.interface.outputs

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["interface"] = self.interface.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_NAME) -> ExportManifest:
        try:
            legacy = {key: data[key] for key in LEGACY_KEYS if key in data}
            kept = known_fields(cls, {k: v for k, v in data.items() if k not in LEGACY_KEYS}, where)
            kept["units"] = [UnitRecord(**known_fields(UnitRecord, u, where)) for u in kept.get("units", [])]
            if "interface" in data:
                kept["interface"] = GraphInterface.from_dict(data["interface"], where)
            else:  # written before the interface object: top-level inputs, outputs and kv_cache
                specs = [legacy.get(key) or [] for key in ("inputs", "outputs")]
                kept["interface"] = GraphInterface.from_legacy(*specs, bool(legacy.get("kv_cache")), where)
            return cls(**kept)
        except TypeError as exc:
            raise FormatError(f"{where}: not a moe-export ONNX manifest ({exc})") from exc
        except FormatError as exc:
            raise FormatError(f"{where}: {str(exc).removeprefix('export manifest: ')}") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ExportManifest:
        path = Path(directory) / MANIFEST_NAME
        data = read_json_object(path, f"is {directory} a `moe-export onnx` output directory?")
        return cls.from_dict(data, where=str(path))


def portable_path(target: str | Path, out_dir: Path) -> str:
    """`target` as export.json records it: relative to the export directory when both lie under a common
    directory below the file system root (moving a project tree keeps the export valid), else absolute."""
    target, out_dir = Path(target).resolve(), Path(out_dir).resolve()
    common = Path(os.path.commonpath([target, out_dir]))
    return os.path.relpath(target, out_dir) if common != Path(common.anchor) else str(target)


@dataclass
class Artifact:
    """An export directory and its manifest: the one reader of a `moe-export onnx` output (validate, bench, trt)."""

    path: Path
    manifest: ExportManifest

    @classmethod
    def open(
        cls, directory: str | Path, checkpoint: str | Path | None = None, base_model: str | Path | None = None
    ) -> Artifact:
        """Read an export; its recorded source paths become absolute (relative ones are relative to the export
        directory), and `checkpoint` / `base_model` replace them (the sources moved: validate --ckpt/--base)."""
        path = Path(directory)
        if not path.is_dir():
            raise FormatError(f"{path}: artifact directory not found (expected the output of `moe-export onnx`)")
        path = path.resolve()
        manifest = ExportManifest.load(path)
        for key, override, option in (
            ("source_checkpoint", checkpoint, "--ckpt"),
            ("base_model", base_model, "--base"),
        ):
            if override is not None and not Path(override).is_dir():
                raise FormatError(f"{option} {override}: directory not found")
            recorded = Path(getattr(manifest, key))
            relative = manifest.relative_sources.get(key)
            if override is not None:
                recorded = Path(override)
            elif not recorded.is_dir() and relative is not None and (path / relative).is_dir():
                recorded = path / relative  # the project tree moved as a whole
            setattr(manifest, key, str(recorded.resolve()))
        return cls(path, manifest)

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def base_only(self) -> bool:
        return self.manifest.base_only

    @property
    def interface(self) -> GraphInterface:
        return self.manifest.interface

    def input_names(self) -> list[str]:
        return self.manifest.interface.input_names()

    def output_names(self) -> list[str]:
        return self.manifest.interface.output_names()

    def model_config(self, key: str) -> int | None:
        """An integer field of the copied config.json, else of the base model's (absent or unreadable: None)."""
        for candidate in (self.path / "config.json", Path(self.manifest.base_model) / "config.json"):
            try:
                value = json.loads(candidate.read_text()).get(key) if candidate.is_file() else None
            except (OSError, UnicodeDecodeError, AttributeError, json.JSONDecodeError):
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    def vocab_size(self) -> int:
        """Random token ids need it: from config.json (see `model_config`)."""
        vocab = self.model_config("vocab_size")
        if vocab is not None:
            return vocab
        raise FormatError(
            f"{self.path}: no config.json with vocab_size here or in the base model; pass --inputs FILE.npz"
        )
