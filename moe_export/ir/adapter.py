"""The canonical adapter and its on-disk layout: manifest.json (headers) + tensors.safetensors.

The layout is described in docs/formats.md ("canonical"). Shape legend as in units.py: E experts, E_A
experts owning an A, R rank, D_in / D_out feature sizes.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_export.errors import FormatError
from moe_export.files import known_fields, known_keys, read_json_object
from moe_export.ir.units import ExpertStack, FFNMoE, LinearMoE, Router, SharedLoRA, TaskGate, Unit

IR_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSORS_NAME = "tensors.safetensors"


@dataclass
class Adapter:
    """Base-model reference + units + global task gates + provenance."""

    family: str
    units: list[Unit]
    base_model: str | None = None
    task_gates: dict[str, TaskGate] = field(default_factory=dict)
    source_config: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)  # e.g. "top_k not saved, defaulted to 2"

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for unit in self.units:
            if unit.name in seen:
                raise FormatError(f"unit {unit.name} appears twice in the adapter")
            seen.add(unit.name)
            router = unit.router
            if router is not None and router.kind == "task" and router.task_gate not in self.task_gates:
                raise FormatError(f"unit {unit.name} names task gate {router.task_gate!r}, which is not in the adapter")

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    @property
    def routed_units(self) -> list[Unit]:
        return [u for u in self.units if u.routed]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under its canonical key (docs/formats.md, "canonical")."""
        return adapter_tensors(self)

    def to_manifest(self) -> dict[str, Any]:
        return adapter_manifest(self)

    def save(self, directory: str | Path) -> Path:
        """Write manifest.json + tensors.safetensors into `directory` (created)."""
        return save_adapter(self, directory)

    @classmethod
    def load(cls, directory: str | Path) -> Adapter:
        """Read a canonical adapter written by `save` (or by hand, following the same layout)."""
        return load_adapter_dir(directory)

    @classmethod
    def from_manifest(
        cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], where: str = "manifest"
    ) -> Adapter:
        return adapter_from_manifest(manifest, tensors, where)


def adapter_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Every tensor under its canonical key (docs/formats.md, "canonical")."""
    out: dict[str, torch.Tensor] = {}
    for unit in adapter.units:
        out.update(_unit_tensors(unit))
    for name, gate in adapter.task_gates.items():
        out[f"task_gates.{name}.embedding"] = gate.embedding
        out[f"task_gates.{name}.gate"] = gate.gate
    return out


def adapter_manifest(adapter: Adapter) -> dict[str, Any]:
    return {
        "format": "moe-export-canonical",
        "ir_version": IR_VERSION,
        "family": adapter.family,
        "base_model": adapter.base_model,
        "units": [_unit_header(u) for u in adapter.units],
        "task_gates": sorted(adapter.task_gates),
        "source_config": adapter.source_config,
        "notices": adapter.notices,
    }


def save_adapter(adapter: Adapter, directory: str | Path) -> Path:
    """Write manifest.json + tensors.safetensors into `directory` (created)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_tensors(adapter).items()}
    save_file(tensors, str(directory / TENSORS_NAME))
    (directory / MANIFEST_NAME).write_text(json.dumps(adapter_manifest(adapter), indent=2, sort_keys=False) + "\n")
    return directory


def load_adapter_dir(directory: str | Path) -> Adapter:
    """Read a canonical adapter written by `save` (or by hand, following the same layout)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest_path, tensors_path = directory / MANIFEST_NAME, directory / TENSORS_NAME
    for p in (manifest_path, tensors_path):
        if not p.is_file():
            raise FormatError(f"{p}: missing (a canonical adapter is {MANIFEST_NAME} + {TENSORS_NAME})")
    manifest = read_json_object(manifest_path, f"a canonical adapter is {MANIFEST_NAME} + {TENSORS_NAME}")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{tensors_path}: not a readable safetensors file ({exc})") from exc
    return adapter_from_manifest(manifest, tensors, where=str(manifest_path))


def adapter_from_manifest(
    manifest: dict[str, Any], tensors: dict[str, torch.Tensor], where: str = "manifest"
) -> Adapter:
    if manifest.get("format") != "moe-export-canonical":
        raise FormatError(f"{where}: 'format' is {manifest.get('format')!r}, expected 'moe-export-canonical'")
    if int(manifest.get("ir_version", 0)) > IR_VERSION:
        warnings.warn(f"{where}: ir_version {manifest['ir_version']} is newer than {IR_VERSION}", stacklevel=2)
    used: set[str] = set()

    def take(key: str, required: bool = True) -> torch.Tensor | None:
        if key not in tensors:
            if required:
                raise FormatError(f"{where}: tensor {key!r} is missing from {TENSORS_NAME}")
            return None
        used.add(key)
        return tensors[key]

    gates = {
        name: TaskGate(name, take(f"task_gates.{name}.embedding"), take(f"task_gates.{name}.gate"))
        for name in manifest.get("task_gates", [])
    }
    units = [_unit_from_header(h, take, where) for h in manifest.get("units", [])]
    extra = sorted(set(tensors) - used)
    if extra:
        raise FormatError(f"{where}: tensors {extra[:5]} are not referenced by any unit in the manifest")
    known = {"format", "ir_version", "family", "base_model", "units", "task_gates", "source_config", "notices"}
    known_keys(known, manifest, where)
    return Adapter(
        family=manifest.get("family", "canonical"),
        units=units,
        base_model=manifest.get("base_model"),
        task_gates=gates,
        source_config=manifest.get("source_config", {}),
        notices=list(manifest.get("notices", [])),
    )


def _router_header(router: Router) -> dict[str, Any]:
    header = {k: v for k, v in asdict(router).items() if k not in ("weight", "bias")}
    header["has_bias"] = router.bias is not None
    return header


def _router_tensors(prefix: str, router: Router | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if router is not None and router.weight is not None:
        out[f"{prefix}.router.weight"] = router.weight
    if router is not None and router.bias is not None:
        out[f"{prefix}.router.bias"] = router.bias
    return out


def _stack_tensors(prefix: str, stack: ExpertStack) -> dict[str, torch.Tensor]:
    return {f"{prefix}.experts.A": stack.A, f"{prefix}.experts.B": stack.B, f"{prefix}.experts.scaling": stack.scaling}


def _unit_tensors(unit: Unit) -> dict[str, torch.Tensor]:
    out = _router_tensors(unit.name, unit.router)
    if isinstance(unit, LinearMoE):
        if unit.experts is not None:
            out.update(_stack_tensors(unit.name, unit.experts))
        for j, s in enumerate(unit.shared):
            out[f"{unit.name}.shared.{j}.A"] = s.A
            out[f"{unit.name}.shared.{j}.B"] = s.B
    else:
        for proj, stack in unit.experts.items():
            out.update(_stack_tensors(f"{unit.name}.{proj}", stack))
    return out


def _unit_header(unit: Unit) -> dict[str, Any]:
    header: dict[str, Any] = {"kind": unit.kind, "name": unit.name}
    header["router"] = _router_header(unit.router) if unit.router is not None else None
    if isinstance(unit, LinearMoE):
        header.update(
            in_features=unit.in_features, out_features=unit.out_features, has_experts=unit.experts is not None
        )
        header["shared"] = [{"scaling": s.scaling, "origin": s.origin} for s in unit.shared]
    else:
        header.update(arch=unit.arch, act_fn=unit.act_fn, projections=sorted(unit.experts))
    return header


def _router_from_header(header: dict[str, Any] | None, prefix: str, take: Any, where: str) -> Router | None:
    if header is None:
        return None
    header = dict(header)
    has_bias = header.pop("has_bias", False)
    kwargs = known_fields(Router, header, f"{where}: {prefix}.router")
    kwargs["weight"] = take(f"{prefix}.router.weight", required=kwargs.get("kind") == "linear")
    kwargs["bias"] = take(f"{prefix}.router.bias") if has_bias else None
    return Router(**kwargs)


def _stack_from(prefix: str, take: Any) -> ExpertStack:
    return ExpertStack(take(f"{prefix}.experts.A"), take(f"{prefix}.experts.B"), take(f"{prefix}.experts.scaling"))


def _unit_from_header(header: dict[str, Any], take: Any, where: str) -> Unit:
    name, kind = header.get("name"), header.get("kind")
    if not name:
        raise FormatError(f"{where}: a unit has no name")
    router = _router_from_header(header.get("router"), name, take, where)
    if kind == "linear_moe":
        shared = [
            SharedLoRA(
                take(f"{name}.shared.{j}.A"), take(f"{name}.shared.{j}.B"), float(s["scaling"]), s.get("origin", "lora")
            )
            for j, s in enumerate(header.get("shared", []))
        ]
        experts = _stack_from(name, take) if header.get("has_experts") else None
        return LinearMoE(name, int(header["in_features"]), int(header["out_features"]), experts, router, shared)
    if kind == "ffn_moe":
        if router is None:
            raise FormatError(f"{where}: ffn_moe unit {name} has no router")
        experts = {proj: _stack_from(f"{name}.{proj}", take) for proj in header.get("projections", [])}
        return FFNMoE(name, header["arch"], header["act_fn"], router, experts)
    raise FormatError(f"{where}: unit {name} has unknown kind {kind!r} (linear_moe or ffn_moe)")
