"""CalibrateOptions and MergeOptions: the settings of `moe-export calibrate` / `merge` as data (config.py).

One field per flag; `moe_export.calibrate` and `moe_export.merge` (merging/run.py) take them, and the CLI
only parses flags into them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from moe_export.config import Options, at_least, existing_file, help_text, one_of
from moe_export.errors import MergeError

FORWARDS = ("auto", "layers", "whole")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_calibration_sizes(samples: int, seq_len: int) -> None:
    for option, value in (("--samples", samples), ("--seq-len", seq_len)):
        if value < 1:
            raise MergeError(f"{option} {value}: must be >= 1")


def check_merge_choice(threshold: float | None, budget: float | None) -> None:
    """--merge-threshold / --merge-budget: at most one, each in its range."""
    if threshold is not None and budget is not None:
        raise MergeError("--merge-threshold and --merge-budget exclude each other; pass one")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise MergeError(f"--merge-threshold {threshold}: a dominance threshold must be in (0, 1]")
    if budget is not None and not budget >= 0.0:
        raise MergeError(f"--merge-budget {budget}: a total error budget must be >= 0")


def check_forward_choice(forward: str, device: str, resolved: str | None = None) -> None:
    """--forward and the spelling of --device, and `whole` only on the CPU. `resolved` is the device --device
    names on this machine (layerwise.check_forward knows it when the run starts); without it only an explicit
    cuda is refused."""
    one_of(forward, FORWARDS, "--forward")
    if not DEVICE_PATTERN.match(device):
        raise MergeError(f"--device {device}: not a torch device (expected cpu, cuda, cuda:N or auto)")
    if forward == "whole" and (resolved or device).startswith("cuda"):
        raise MergeError(f"--forward whole runs on the CPU; --device {device} needs --forward layers (or auto)")


@dataclass(frozen=True)
class CalibrateOptions(Options):
    """How a calibration run reads its text and runs the reference."""

    data: str | None = field(default=None, metadata=help_text("calibration text, one sample per line (None: built-in)"))
    samples: int = field(default=32, metadata=help_text("calibration samples (merge: as many held out)"))
    seq_len: int = field(default=64, metadata=help_text("max tokens per sample"))
    seed: int = field(default=0, metadata=help_text("seed of the sample order (and of random tokens)"))
    device: str = field(default="auto", metadata=help_text("cpu, cuda[:N] or auto (cuda when present)"))
    forward: str = field(default="auto", metadata=help_text("layers | whole | auto: how the reference runs"))
    progress: bool = field(default=True, metadata=help_text("show progress bars on stderr"))

    def __post_init__(self) -> None:
        if self.data is not None:
            object.__setattr__(self, "data", str(self.data))
        check_calibration_sizes(self.samples, self.seq_len)
        existing_file(self.data, "--data", "calibration text file")
        check_forward_choice(self.forward, self.device)


@dataclass(frozen=True)
class MergeOptions(Options):
    """Which units a merge folds and how it is measured; `calibration` says how the statistics are made."""

    NESTED: ClassVar = {"calibration": CalibrateOptions}

    threshold: float | None = field(default=None, metadata=help_text("merge units whose dominance >= T (0 < T <= 1)"))
    budget: float | None = field(default=None, metadata=help_text("merge lowest-error units while the total <= B"))
    stats: str | None = field(default=None, metadata=help_text("statistics file of `moe-export calibrate`"))
    evaluate: bool = field(default=True, metadata=help_text("measure the merge on held-out calibration tokens"))
    calibration: CalibrateOptions = field(
        default_factory=CalibrateOptions, metadata=help_text("the calibration set and how the reference runs")
    )

    def __post_init__(self) -> None:
        if self.stats is not None:
            object.__setattr__(self, "stats", str(self.stats))
        check_merge_choice(self.threshold, self.budget)
        at_least(self.budget, 0, "--merge-budget")
        existing_file(self.stats, "--stats", "statistics file")

    @property
    def selects(self) -> bool:
        """A threshold or a budget is given (else only exact folds are merged)."""
        return self.threshold is not None or self.budget is not None
