"""GOAT (Facico/GOAT-PEFT): per-linear top-k MoE-LoRA whose SVD init also modified the base weight.

docs/formats.md ("goat"). The checkpoint holds only the LoRA experts and routers; GOAT's init
subtracted `init_cof * s * B0 A0` from W, and GOAT's own loader re-does that on the original W. We
recompute the same term by SVD of the original base weight and keep it as an always-on shared LoRA.
Legend: E experts, R total rank (config `r`), R_e = R // E expert rank, D_in / D_out linear sizes.
Layout source: Facico/GOAT-PEFT (peft 0.14 layout).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moe_export.errors import FormatError
from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.formats.common import (
    expert_linear,
    peft_expert_modules,
    require_float,
    require_int,
    softmax_topk_router,
)
from moe_export.formats.registry import Family, Signature, register
from moe_export.ir import Adapter, SharedLoRA

# peft's clones of lora_A/B, dropped (key tails after the module path).
CLONE_PARTS = (r"moe_layer\.experts\.\d+\.lora_[AB]\.weight",)

# GOAT's `svd_init` runs only for these exact init types (others raise NotImplementedError there).
SVD_INIT_TYPES = ("goat", "goat_mini", "pissa", "pissa_scale", "milora", "pissa_milora")
RHO = 10.0  # hard-coded in GOAT's svd_init


def goat_scaling(init_type: str, alpha: float, rank: int, num_experts: int, in_features: int) -> float:
    """Expert scaling s, GOAT's `update_layer` rules in their order (env ETA / SCALING assumed unset)."""
    expert_rank = rank // num_experts
    if "scale" in init_type:
        return math.sqrt(3 * 1.0 * in_features / expert_rank)  # ETA defaults to 1.0
    if init_type in ("guassian", "bert"):  # sic, GOAT's spelling
        return 1.0
    if init_type == "pissa":
        return 2.0
    if "rs" in init_type:
        return alpha / math.sqrt(expert_rank)
    return alpha / expert_rank


def svd_selection(init_type: str, num_singular: int, rank: int, num_experts: int) -> list[int]:
    """Indices of the singular components GOAT's svd_init takes, with its exact Python slicing."""
    idx = list(range(num_singular))
    if init_type == "milora":
        return idx[-rank:]
    if init_type in ("pissa", "pissa_scale"):
        return idx[:rank]
    if init_type == "pissa_milora":
        return idx[: rank // 2] + idx[-rank // 2 :]  # -rank // 2 is floor(-rank / 2), as in GOAT
    piece, expert_rank = num_singular // num_experts, rank // num_experts
    if init_type == "goat":
        return [j for e in range(num_experts) for j in idx[e * piece : e * piece + expert_rank]]
    if init_type == "goat_mini":
        return [j for e in range(num_experts) for j in idx[(e + 1) * piece - expert_rank : (e + 1) * piece]]
    raise FormatError(f"GOAT init_type {init_type!r} has no SVD init")


def base_correction(weight: torch.Tensor, init_type: str, rank: int, num_experts: int, coef: float) -> SharedLoRA:
    """W' - W = -(init_cof / rho) V_sel diag(S_sel) Uh_sel, as an always-on LoRA (computed in fp32).

    GOAT subtracts init_cof * s * B0 A0 with B0 A0 = V_sel diag(S_sel / (s rho)) Uh_sel: s cancels.
    """
    v, s, uh = torch.linalg.svd(weight.float(), full_matrices=False)  # [D_out, k], [k], [k, D_in]
    sel = torch.tensor(svd_selection(init_type, s.shape[0], rank, num_experts), dtype=torch.long)
    b = -(coef / RHO) * v[:, sel] * s[sel]  # [D_out, R]
    return SharedLoRA(A=uh[sel].contiguous(), B=b.contiguous(), scaling=1.0, origin="goat_base_correction")


@register
class Goat(Family):
    name = "goat"
    title = "GOAT"
    signature = Signature(("GOAT",), keys=(r"\.lora_gating\.weight$", r"\.lora_A\.\d+\.weight$"))
    default_top_k = 2
    needs_base_weights = True

    @classmethod
    def load(cls, ckpt: Checkpoint, base: BaseWeights | None) -> Adapter:
        config = ckpt.require_config("r", "lora_alpha", "num_experts")
        where = str(ckpt.config_path)
        rank, num_experts = require_int(config, "r", where), require_int(config, "num_experts", where)
        alpha = require_float(config, "lora_alpha", where)
        top_k = require_int(config, "top_k", where) if "top_k" in config else int(cls.default_top_k or 2)
        init_type = str(config.get("init_type") or "goat")
        coef = (
            require_float(config, "init_cof", where) if config.get("init_cof") is not None else 1.0
        )  # GOATLayer's default
        if rank // num_experts < 1:
            raise FormatError(f"{where}: r={rank} is smaller than num_experts={num_experts}")
        correct = init_type in SVD_INIT_TYPES
        if correct and base is None:
            raise FormatError(f"{ckpt.path}: GOAT init_type {init_type!r} needs the base model weights (--base)")
        units = []
        experts = peft_expert_modules(ckpt, cls.title, "lora_gating", num_experts, rank // num_experts, CLONE_PARTS)
        for module, a_list, b_list, router_weight in experts:
            d_in, d_out = a_list[0].shape[1], b_list[0].shape[0]
            scaling = goat_scaling(init_type, alpha, rank, num_experts, d_in)
            # GOAT casts x to the fp32 LoRA dtype before routing.
            router = softmax_topk_router(router_weight, top_k, compute_dtype="float32")
            shared = [_correction(base, module, d_in, d_out, init_type, rank, num_experts, coef)] if correct else []
            units.append(expert_linear(module, a_list, b_list, scaling, router, shared))
        adapter = Adapter(family=cls.name, units=units, source_config=_source_config(config, init_type, coef, correct))
        adapter.notices.append(
            "GOAT reads env vars ETA and SCALING at training time and does not save them; assumed unset"
        )
        if correct:
            adapter.notices.append(
                f"base-weight correction recomputed by SVD of the original base weights (init_type={init_type}, "
                f"coef=init_cof/{RHO:g}={coef / RHO:g}); kept as shared LoRA 'goat_base_correction'"
            )
        return adapter


def _correction(
    base: BaseWeights | None,
    module: str,
    d_in: int,
    d_out: int,
    init_type: str,
    rank: int,
    num_experts: int,
    coef: float,
) -> SharedLoRA:
    assert base is not None
    weight = base.linear_weight(module)  # [D_out, D_in], the original (unmodified) base weight
    if tuple(weight.shape) != (d_out, d_in):
        raise FormatError(
            f"{module}: adapter expects Linear({d_in} -> {d_out}), base model {base.directory} has weight "
            f"{tuple(weight.shape)}; is --base the model the adapter was trained on?"
        )
    return base_correction(weight, init_type, rank, num_experts, coef)


def _source_config(config: dict[str, Any], init_type: str, coef: float, correct: bool) -> dict[str, Any]:
    recipe = {"svd_select": init_type, "coef": coef / RHO, "rho": RHO, "init_cof": coef} if correct else None
    return {"adapter_config": config, "goat_base_correction": recipe}
