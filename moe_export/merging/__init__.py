"""Merge statically dominant experts into the base weights (docs/merging.md).

options.py (CalibrateOptions, MergeOptions) -> run.py (`calibrate`, `merge`: whole model or layer-streamed) ->
calibration_data.py (which tokens) -> statistics.py (calibration) -> plan.py (which units fold, pure data) -> apply.py (merged reference model;
report.py: what it cost) -> write.py (merged HF directory, shard by shard). The fold itself is `moe_export.ir.fold`.
"""

from moe_export.merging.apply import apply_merge_plan
from moe_export.merging.options import CalibrateOptions, MergeOptions
from moe_export.merging.plan import MergePlan, UnitMerge, plan_merge
from moe_export.merging.report import MergeReport, MergeResult
from moe_export.merging.run import calibrate, merge
from moe_export.merging.statistics import CalibrationStats
from moe_export.merging.write import save_merged

__all__ = [
    "CalibrateOptions",
    "CalibrationStats",
    "MergeOptions",
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
