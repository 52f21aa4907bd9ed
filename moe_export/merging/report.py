"""What a merge did and what it cost: the per-unit table, the held-out logits error, and the result bundle."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moe_export.ir import Adapter, short_unit_name
from moe_export.merging.plan import MergePlan
from moe_export.merging.statistics import CalibrationStats

if TYPE_CHECKING:
    from rich.console import Console

    from moe_export.reference.loading import LoadedAdapter


@dataclass
class UnitReport:
    """One row of the merge table."""

    name: str
    num_experts: int
    action: str  # the plan's reason, "routed" (kept), or "skipped"
    shared_folded: bool = False
    dominance: float | None = None
    entropy: float | None = None
    error_predicted: float | None = None  # ε on the calibration tokens
    error_measured: float | None = None  # ε of the fold on held-out tokens


@dataclass
class MergeReport:
    """What a merge did and what it cost, per unit and on the whole model's logits (held-out tokens)."""

    units: list[UnitReport] = field(default_factory=list)
    logits_rel_error: float | None = None  # ‖L_merged − L_ref‖ / ‖L_ref‖ over all held-out tokens
    top1_agreement: float | None = None  # fraction of held-out tokens whose argmax agrees
    heldout_tokens: int = 0
    heldout_source: str | None = None
    threshold: float | None = None
    budget: float | None = None
    notices: list[str] = field(default_factory=list)

    @property
    def merged(self) -> list[UnitReport]:
        return [u for u in self.units if u.action not in ("routed", "skipped")]

    @property
    def predicted_total(self) -> float:
        return sum(u.error_predicted or 0.0 for u in self.merged if u.num_experts)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["predicted_total"] = self.predicted_total
        return data

    def render(self, console: Console) -> None:
        from rich.table import Table

        def num(v: float | None, fmt: str = ".3g") -> str:
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

        table = Table(title="Merge plan (L = decoder layer)", title_justify="left")
        for col in ("unit", "E", "action", "dominance", "entropy", "ε predicted", "ε measured"):
            table.add_column(col, justify="left" if col in ("unit", "action") else "right", no_wrap=col == "unit")
        for u in self.units:
            action = u.action + ("+shared" if u.shared_folded and u.num_experts else "")
            table.add_row(
                short_unit_name(u.name),
                str(u.num_experts),
                action,
                num(u.dominance, ".3f"),
                num(u.entropy, ".3f"),
                num(u.error_predicted),
                num(u.error_measured),
            )
        console.print(table)
        routed = [u for u in self.units if u.num_experts]
        folded = [u for u in self.merged if u.num_experts]
        console.print(
            f"folded {len(folded)} of {len(routed)} routed units, predicted Σε = {self.predicted_total:.3g}",
            highlight=False,
        )
        if self.heldout_tokens:
            console.print(
                f"held-out ({self.heldout_source}, {self.heldout_tokens} tokens): logits rel. error "
                f"{num(self.logits_rel_error)}, top-1 agreement {num(self.top1_agreement, '.4f')}",
                highlight=False,
            )
        for notice in self.notices:
            console.print(f"note: {notice}", highlight=False)


@dataclass
class MergeResult:
    """The merged reference + remaining adapter (`loaded`), the plan, the report and the adapter before the merge."""

    loaded: LoadedAdapter
    plan: MergePlan
    report: MergeReport
    source_adapter: Adapter
    stats: CalibrationStats | None = None
