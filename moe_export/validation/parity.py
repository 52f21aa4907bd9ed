"""Comparing two runners' outputs (Polygraphy-style: comparison lives apart from running).

    compare = compare_func(atol=1e-6, rtol=1e-4, per_output={"logits": Tolerance(0, 1e-3)})
    result = compare(reference_outputs, candidate_outputs)
    if not result: print(result.failures())

Error definition (one for every output): `abs = |candidate - reference|` elementwise, and the relative
error is **scale-relative**: `rel = abs / max|reference|` (the largest reference magnitude of that output).
An output passes when `max(abs) <= atol + rtol * max|reference|`. Elementwise relative error is avoided
because logits cross zero: near-zero logits would give huge relative errors without meaning anything.
A comparison never passes on NaN/Inf (either side), a shape or dtype-kind mismatch, a missing output, or
nothing to compare (no outputs, zero-size arrays).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moe_export.export.interface import LOGITS


@dataclass(frozen=True)
class Tolerance:
    """Absolute and scale-relative tolerances; see the module docstring for the definition."""

    atol: float
    rtol: float

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0:
            raise ValueError(f"tolerances must be >= 0, got atol={self.atol} rtol={self.rtol}")

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale


@dataclass
class OutputComparison:
    """Error statistics of one output; `passed` is False with `messages` saying why."""

    name: str
    passed: bool
    atol: float
    rtol: float
    reference_shape: list[int] | None = None
    candidate_shape: list[int] | None = None
    reference_dtype: str | None = None
    candidate_dtype: str | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    mean_abs: float | None = None
    p99_abs: float | None = None
    reference_scale: float | None = None  # max |reference|
    bound: float | None = None  # atol + rtol * reference_scale
    worst_index: list[int] | None = None
    nan_count: int = 0  # in the candidate
    inf_count: int = 0
    reference_nan_count: int = 0
    reference_inf_count: int = 0
    top1_agreement: float | None = None  # logits only: fraction of positions with the same argmax
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.messages:
            return "; ".join(self.messages)
        return f"max abs {self.max_abs:.3g} <= {self.bound:.3g}"


@dataclass
class CompareResult:
    """Per-output comparisons; truthy when every output passed and there was something to compare."""

    outputs: dict[str, OutputComparison]
    messages: list[str] = field(default_factory=list)  # result-level failures (e.g. nothing compared)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and not self.messages and all(c.passed for c in self.outputs.values())

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> list[str]:
        """One line per failing output (and per result-level problem)."""
        lines = list(self.messages)
        lines += [f"{c.name}: {c.summary()}" for c in self.outputs.values() if not c.passed]
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "messages": self.messages,
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
        }


CompareFunc = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], CompareResult]


def compare_func(
    atol: float = 1e-6,
    rtol: float = 1e-4,
    per_output: dict[str, Tolerance] | None = None,
    min_top1: float | None = None,
    logits_names: tuple[str, ...] = (LOGITS,),
) -> CompareFunc:
    """Build a comparison of (reference, candidate) output dicts.

    `per_output` overrides the tolerance of named outputs; `min_top1` (optional) also gates the top-1
    token agreement of logits outputs (the last axis is the vocabulary).
    """
    default = Tolerance(atol, rtol)
    overrides = dict(per_output or {})

    def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> CompareResult:
        result = CompareResult({})
        if not reference:
            result.messages.append("nothing to compare: the reference produced no outputs")
        for name, ref in reference.items():
            tol = overrides.get(name, default)
            if name not in candidate:
                result.outputs[name] = OutputComparison(
                    name,
                    False,
                    tol.atol,
                    tol.rtol,
                    messages=[f"missing from the candidate's outputs {sorted(candidate)}"],
                )
                continue
            gate_top1 = min_top1 if name in logits_names else None
            result.outputs[name] = compare_arrays(name, ref, candidate[name], tol, name in logits_names, gate_top1)
        return result

    return compare


def _float64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(np.float64, copy=False)


def compare_arrays(
    name: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    tol: Tolerance,
    is_logits: bool = False,
    min_top1: float | None = None,
) -> OutputComparison:
    """Statistics and verdict for one output pair."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    c = OutputComparison(
        name,
        passed=False,
        atol=tol.atol,
        rtol=tol.rtol,
        reference_shape=list(reference.shape),
        candidate_shape=list(candidate.shape),
        reference_dtype=str(reference.dtype),
        candidate_dtype=str(candidate.dtype),
    )
    if reference.shape != candidate.shape:
        c.messages.append(f"shape mismatch: reference {list(reference.shape)} vs candidate {list(candidate.shape)}")
        return c
    if reference.size == 0:
        c.messages.append(f"empty output (shape {list(reference.shape)}): nothing to compare")
        return c
    if reference.dtype.kind != candidate.dtype.kind:
        c.messages.append(f"dtype mismatch: reference {reference.dtype} vs candidate {candidate.dtype}")
    ref, cand = _float64(reference), _float64(candidate)
    c.nan_count, c.inf_count = int(np.isnan(cand).sum()), int(np.isinf(cand).sum())
    c.reference_nan_count, c.reference_inf_count = int(np.isnan(ref).sum()), int(np.isinf(ref).sum())
    if c.nan_count or c.inf_count:
        c.messages.append(f"candidate has {c.nan_count} NaN and {c.inf_count} Inf values")
    if c.reference_nan_count or c.reference_inf_count:
        c.messages.append(f"reference has {c.reference_nan_count} NaN and {c.reference_inf_count} Inf values")
    finite = np.isfinite(ref) & np.isfinite(cand)
    diff = np.where(finite, np.abs(cand - ref), 0.0)
    scale = float(np.abs(np.where(np.isfinite(ref), ref, 0.0)).max())
    c.max_abs = float(diff.max())
    c.worst_index = [int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape)]
    c.mean_abs = float(diff.mean())
    c.p99_abs = float(np.percentile(diff, 99))
    c.reference_scale = scale
    c.max_rel = c.max_abs / scale if scale > 0 else (0.0 if c.max_abs == 0 else float("inf"))
    c.bound = tol.bound(scale)
    if c.max_abs > c.bound:
        c.messages.append(
            f"max abs error {c.max_abs:.3g} at {c.worst_index} exceeds {c.bound:.3g} "
            f"(atol {tol.atol:g} + rtol {tol.rtol:g} x max|ref| {scale:.3g}); max rel {c.max_rel:.3g}"
        )
    if is_logits and ref.ndim >= 1 and ref.shape[-1] > 0:
        c.top1_agreement = float((ref.argmax(-1) == cand.argmax(-1)).mean())
        if min_top1 is not None and c.top1_agreement < min_top1:
            c.messages.append(f"top-1 token agreement {c.top1_agreement:.4f} < {min_top1}")
    c.passed = not c.messages
    return c
