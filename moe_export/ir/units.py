"""The canonical adapter: one in-memory model of every MoE-LoRA family, saved as JSON + safetensors.

Shape legend: E experts, E_A experts that own an A (E or 1), R rank, D_in / D_out linear sizes,
T tokens, K experts selected per token.

Semantics of a `LinearMoE` named `name` (an `nn.Linear` of the base model):
    y = W x + b + sum_shared s B A x + sum_{e in sel(x)} g_e(x) s_e B_e A_{e or 0} x
Semantics of an `FFNMoE` (MixLoRA, one router per MLP block):
    out = sum_{e in sel(x)} g_e(x) FFN(x; W_p + s_e B_{p,e} A_{p,e} for each adapted projection p)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from moe_export.errors import FormatError

RouterKind = Literal["linear", "task", "none"]
RouterSelect = Literal["dense", "topk", "top_p"]


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


# LoRA factors and routers are trained floats; an integer or bool tensor is a broken conversion (its values
# would be cast silently and exported as nonsense), and float64 is refused too: the export graphs are
# fp32/fp16/bf16, and no trainer of these families writes fp64.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weights(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse adapter weights no export can carry: a dtype other than fp32/fp16/bf16, or NaN/Inf values."""
    for key, t in tensors.items():
        if t.dtype not in WEIGHT_DTYPES:
            raise FormatError(
                f"{where}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}; adapter weights must be "
                "float32, float16 or bfloat16"
            )
    check_finite(tensors, where)


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
