"""Whole-model agreement of merged vs reference logits on held-out tokens (the merge report's last line)."""

from __future__ import annotations

import math
from typing import Any

import torch


class LogitsAgreement:
    """Running relative logits error and top-1 agreement over samples ([1, L, V] logits each), in fp64."""

    def __init__(self) -> None:
        self.diff_sq = self.ref_sq = 0.0
        self.agree = self.tokens = 0

    @torch.no_grad()
    def add(self, reference: torch.Tensor, merged: torch.Tensor) -> None:
        ref, got = reference.double(), merged.double()  # [1, L, V]
        self.diff_sq += float((got - ref).pow(2).sum())
        self.ref_sq += float(ref.pow(2).sum())
        self.agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        self.tokens += ref.shape[0] * ref.shape[1]

    def summary(self, source: str) -> dict[str, Any]:
        """The MergeReport fields: logits_rel_error, top1_agreement, heldout_tokens, heldout_source."""
        return {
            "logits_rel_error": math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else None,
            "top1_agreement": self.agree / self.tokens if self.tokens else None,
            "heldout_tokens": self.tokens,
            "heldout_source": source,
        }
