"""The canonical adapter: one in-memory model of every MoE-LoRA family, saved as JSON + safetensors.

Shape legend: E experts, E_A experts that own an A (E or 1), R rank, D_in / D_out linear sizes,
T tokens, K experts selected per token.

Semantics of a `LinearMoE` named `name` (an `nn.Linear` of the base model):
    y = W x + b + sum_shared s B A x + sum_{e in sel(x)} g_e(x) s_e B_e A_{e or 0} x
Semantics of an `FFNMoE` (MixLoRA, one router per MLP block):
    out = sum_{e in sel(x)} g_e(x) FFN(x; W_p + s_e B_{p,e} A_{p,e} for each adapted projection p)
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from moe_export.errors import FormatError

IR_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSORS_NAME = "tensors.safetensors"

RouterKind = Literal["linear", "task", "none"]
RouterSelect = Literal["dense", "topk", "top_p"]


def known_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Keep the keys `cls` knows; warn (not fail) on keys from a newer moe-export."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"{where}: ignoring unknown keys {unknown} (written by a newer moe-export?)", stacklevel=3)
    return {k: v for k, v in data.items() if k in names}


@dataclass
class Router:
    """How a unit turns its input into expert weights."""

    kind: RouterKind = field(metadata={"help": "linear: token-wise softmax(G x); task: global task gate; none"})
    num_experts: int = field(metadata={"help": "E, number of experts routed over"})
    select: RouterSelect = field(default="dense", metadata={"help": "dense (all experts), topk or top_p"})
    top_k: int | None = field(default=None, metadata={"help": "k for select=topk"})
    top_p: float | None = field(default=None, metadata={"help": "p for select=top_p (MixLoRA dynamic)"})
    temperature: float = field(default=0.0, metadata={"help": "top_p only: divides the probabilities if > 0"})
    renormalize: bool = field(default=False, metadata={"help": "divide the selected weights by their sum"})
    compute_dtype: str = field(
        default="float32", metadata={"help": "dtype of the router matmul: float32, or 'model' for the model dtype"}
    )
    task_gate: str | None = field(default=None, metadata={"help": "kind=task: name of the TaskGate used"})
    weight: torch.Tensor | None = field(default=None, repr=False, metadata={"help": "[E, D_in] router weight"})
    bias: torch.Tensor | None = field(default=None, repr=False, metadata={"help": "[E] router bias"})

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "task", "none"):
            raise FormatError(f"router kind {self.kind!r} is not one of linear, task, none")
        if self.select not in ("dense", "topk", "top_p"):
            raise FormatError(f"router select {self.select!r} is not one of dense, topk, top_p")
        if self.select == "topk" and not (self.top_k and 1 <= self.top_k <= self.num_experts):
            raise FormatError(f"top_k={self.top_k} must be between 1 and the {self.num_experts} experts")
        if self.select == "top_p" and not (self.top_p is not None and 0.0 < self.top_p <= 1.0):
            raise FormatError(f"top_p={self.top_p} must be in (0, 1]")
        if self.kind == "linear" and self.weight is None:
            raise FormatError("a linear router needs a weight [E, D_in]")
        if self.weight is not None and self.weight.shape[0] != self.num_experts:
            raise FormatError(f"router weight has {self.weight.shape[0]} rows for {self.num_experts} experts")
        if self.kind == "task" and not self.task_gate:
            raise FormatError("a task router must name its task gate")

    @property
    def slots(self) -> int:
        """K: expert slots per token in the grouped op (dense and top_p use every expert)."""
        return self.top_k if self.select == "topk" and self.top_k else self.num_experts


@dataclass
class ExpertStack:
    """E LoRA experts of one linear, stacked: delta_e = scaling[e] * B[e] @ A[e or 0]."""

    A: torch.Tensor  # [E_A, R, D_in]
    B: torch.Tensor  # [E, D_out, R]
    scaling: torch.Tensor  # [E]

    def __post_init__(self) -> None:
        if self.A.ndim != 3 or self.B.ndim != 3 or self.scaling.ndim != 1:
            raise FormatError(f"expert shapes A{tuple(self.A.shape)} B{tuple(self.B.shape)} are not [E,R,in]/[E,out,R]")
        num_a, rank_a, _ = self.A.shape
        num_b, _, rank_b = self.B.shape
        if rank_a != rank_b:
            raise FormatError(f"expert rank mismatch: A has rank {rank_a}, B has rank {rank_b}")
        if num_a not in (num_b, 1):
            raise FormatError(f"{num_a} A matrices for {num_b} experts (must be equal, or 1 shared A)")
        if self.scaling.shape[0] != num_b:
            raise FormatError(f"{self.scaling.shape[0]} scalings for {num_b} experts")

    @property
    def num_experts(self) -> int:
        return self.B.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def shared_a(self) -> bool:
        return self.A.shape[0] == 1 and self.B.shape[0] > 1

    def scaled_b(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """B with the scaling folded in (in fp32, then cast), as the custom op expects."""
        folded = self.B.float() * self.scaling.float()[:, None, None]
        return folded.to(dtype or self.B.dtype)

    def delta(self, expert: int) -> torch.Tensor:
        """[D_out, D_in] fp32 weight delta of one expert."""
        a = self.A[0 if self.A.shape[0] == 1 else expert].float()
        return float(self.scaling[expert]) * (self.B[expert].float() @ a)


@dataclass
class SharedLoRA:
    """An always-on LoRA added with weight 1 (GOAT base correction, MixLoRA attention LoRA, plain LoRA)."""

    A: torch.Tensor  # [R_s, D_in]
    B: torch.Tensor  # [D_out, R_s]
    scaling: float
    origin: str = "lora"  # why it exists: lora | goat_base_correction | ...

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise FormatError(f"shared LoRA shapes A{tuple(self.A.shape)} B{tuple(self.B.shape)} do not chain")

    def delta(self) -> torch.Tensor:
        """[D_out, D_in] fp32 weight delta."""
        return self.scaling * (self.B.float() @ self.A.float())


@dataclass
class LinearMoE:
    """One adapted nn.Linear: base + shared LoRAs + routed experts."""

    name: str  # HF module path relative to the CausalLM, e.g. model.layers.3.self_attn.q_proj
    in_features: int
    out_features: int
    experts: ExpertStack | None = None
    router: Router | None = None
    shared: list[SharedLoRA] = field(default_factory=list)
    kind: Literal["linear_moe"] = "linear_moe"

    def __post_init__(self) -> None:
        where = f"unit {self.name}"
        if (self.experts is None) != (self.router is None or self.router.kind == "none"):
            raise FormatError(f"{where}: experts and router must be given together")
        if self.experts is not None:
            if self.experts.A.shape[2] != self.in_features or self.experts.B.shape[1] != self.out_features:
                raise FormatError(
                    f"{where}: experts A{tuple(self.experts.A.shape)} B{tuple(self.experts.B.shape)} do not fit "
                    f"a Linear({self.in_features} -> {self.out_features})"
                )
            assert self.router is not None
            if self.router.num_experts != self.experts.num_experts:
                raise FormatError(
                    f"{where}: router has {self.router.num_experts} experts, stack has {self.experts.num_experts}"
                )
            if self.router.weight is not None and self.router.weight.shape[1] != self.in_features:
                raise FormatError(
                    f"{where}: router weight {tuple(self.router.weight.shape)} does not take {self.in_features}"
                )
        for s in self.shared:
            if s.A.shape[1] != self.in_features or s.B.shape[0] != self.out_features:
                raise FormatError(f"{where}: shared LoRA A{tuple(s.A.shape)} B{tuple(s.B.shape)} does not fit")

    @property
    def routed(self) -> bool:
        return self.experts is not None


@dataclass
class FFNMoE:
    """MixLoRA: one router per MLP block; expert e is the whole FFN with per-projection LoRA deltas."""

    name: str  # the MLP module path, e.g. model.layers.3.mlp
    arch: str  # llama_gated (gate/up/down)
    act_fn: str  # transformers ACT2FN key, e.g. silu
    router: Router
    experts: dict[str, ExpertStack] = field(default_factory=dict)  # projection name -> stack
    kind: Literal["ffn_moe"] = "ffn_moe"

    def __post_init__(self) -> None:
        for proj, stack in self.experts.items():
            if stack.num_experts != self.router.num_experts:
                raise FormatError(
                    f"unit {self.name}.{proj}: {stack.num_experts} experts, router has {self.router.num_experts}"
                )

    @property
    def routed(self) -> bool:
        return True


@dataclass
class TaskGate:
    """MOELoRA's global gate: g = softmax(gate @ embedding[task_id]), shared by every task-routed unit."""

    name: str
    embedding: torch.Tensor  # [num_tasks + 1, D_task]
    gate: torch.Tensor  # [E, D_task]

    def weights(self, task_id: int) -> torch.Tensor:
        """[E] fp32 expert weights for one task id."""
        if not 0 <= task_id < self.embedding.shape[0]:
            raise FormatError(f"task id {task_id} is out of range 0..{self.embedding.shape[0] - 1} of gate {self.name}")
        emb = self.embedding[task_id].float()
        return torch.softmax(self.gate.float() @ emb, dim=-1)


Unit = LinearMoE | FFNMoE


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
        """Every tensor under its canonical key (formats.md section 7.2)."""
        out: dict[str, torch.Tensor] = {}
        for unit in self.units:
            out.update(_unit_tensors(unit))
        for name, gate in self.task_gates.items():
            out[f"task_gates.{name}.embedding"] = gate.embedding
            out[f"task_gates.{name}.gate"] = gate.gate
        return out

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def to_manifest(self) -> dict[str, Any]:
        return {
            "format": "moe-export-canonical",
            "ir_version": IR_VERSION,
            "family": self.family,
            "base_model": self.base_model,
            "units": [_unit_header(u) for u in self.units],
            "task_gates": sorted(self.task_gates),
            "source_config": self.source_config,
            "notices": self.notices,
        }

    def save(self, directory: str | Path) -> Path:
        """Write manifest.json + tensors.safetensors into `directory` (created)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        save_file(tensors, str(directory / TENSORS_NAME))
        (directory / MANIFEST_NAME).write_text(json.dumps(self.to_manifest(), indent=2, sort_keys=False) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Adapter:
        """Read a canonical adapter written by `save` (or by hand, following the same layout)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        manifest_path, tensors_path = directory / MANIFEST_NAME, directory / TENSORS_NAME
        for p in (manifest_path, tensors_path):
            if not p.is_file():
                raise FormatError(f"{p}: missing (a canonical adapter is {MANIFEST_NAME} + {TENSORS_NAME})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise FormatError(f"{manifest_path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError) as exc:
            raise FormatError(f"{tensors_path}: not a readable safetensors file ({exc})") from exc
        return cls.from_manifest(manifest, tensors, where=str(manifest_path))

    @classmethod
    def from_manifest(
        cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], where: str = "manifest"
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
        unknown = sorted(set(manifest) - known)
        if unknown:
            warnings.warn(f"{where}: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(
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


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/Inf weights: they would silently poison every export."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise FormatError(f"{where}: tensor {key!r} holds {bad} NaN/Inf values; the checkpoint is corrupt")


def short_unit_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `L3.self_attn.q_proj`, for tables that must fit 80 columns."""
    import re

    return re.sub(r"^model\.layers\.(\d+)\.", r"L\1.", name)


def rank_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA scaling alpha/r, or alpha/sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank
