"""Merge statically dominant experts into the base weights (DESIGN.md section 6).

statistics.py (calibration) -> plan.py (which units fold, pure data) -> apply.py (merged reference model;
report.py: what it cost) -> write.py (merged HF directory, shard by shard). The fold itself is `moe_export.ir.fold`.
"""

from moe_export.merging.apply import apply_merge_plan, merge
from moe_export.merging.plan import MergePlan, UnitMerge, plan_merge
from moe_export.merging.report import MergeReport, MergeResult
from moe_export.merging.statistics import CalibrationStats, calibrate
from moe_export.merging.write import save_merged

__all__ = [
    "CalibrationStats",
    "MergePlan",
    "MergeReport",
    "MergeResult",
    "UnitMerge",
    "apply_merge_plan",
    "calibrate",
    "merge",
    "plan_merge",
    "save_merged",
]
