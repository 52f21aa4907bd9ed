"""ValidateOptions: the settings of `moe-export validate` as data (config.py), one field per flag.

The rendering flags (--json, --report, --junit) are the CLI's; everything that decides what is run and how
it is judged is here. `moe_export.validate(export_dir, ValidateOptions(...))` takes them (or their fields as
keywords).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_export.config import Options, at_least, fraction, help_text, one_of
from moe_export.errors import MoeExportError
from moe_export.runtimes.onnxruntime import OPTIMIZATION_LEVELS

DEVICES = ("cpu", "cuda")
DEFAULT_RUNTIMES = ("torch", "onnxruntime")
DEFAULT_SEQ = 32  # --batch without --seq
REFERENCES = ("streamed", "whole")


@dataclass(frozen=True)
class ValidateOptions(Options):
    """What validate runs (runtimes, inputs, devices) and how it judges (tolerances, generation)."""

    runtimes: tuple[str, ...] = field(default=DEFAULT_RUNTIMES, metadata=help_text("the first is the reference"))
    inputs: str | None = field(default=None, metadata=help_text(".npz with the token ids [B,S] (and the mask)"))
    batch: int | None = field(default=None, metadata=help_text("random inputs of this batch size"))
    seq: int | None = field(default=None, metadata=help_text("random inputs of this sequence length"))
    seed: int = field(default=0, metadata=help_text("seed of the random token ids"))
    atol: float | None = field(default=None, metadata=help_text("absolute tolerance (default by export dtype)"))
    rtol: float | None = field(default=None, metadata=help_text("tolerance relative to max|reference| per output"))
    min_top1: float | None = field(default=None, metadata=help_text("also require this top-1 token agreement"))
    max_top1_drop: float | None = field(
        default=None, metadata=help_text("quantized export: fail when more argmaxes change than this share")
    )
    new_tokens: int = field(default=16, metadata=help_text("greedy tokens compared per prompt (0: skip)"))
    threads: int | None = field(default=None, metadata=help_text("intra-op threads for every runtime"))
    device: str = field(default="cpu", metadata=help_text("cpu or cuda"))
    checkpoint: str | None = field(default=None, metadata=help_text("source checkpoint (default: export.json's)"))
    base_model: str | None = field(default=None, metadata=help_text("base model (default: export.json's)"))
    reference: str = field(
        default="streamed",
        metadata=help_text("streamed: the torch reference one decoder layer at a time; whole: the whole model"),
    )
    optimization: str | None = field(
        default=None,
        metadata=help_text(
            "ONNX Runtime graph optimisation of the candidates: disable|basic|extended|all "
            "(default: basic for an fp16 export on the CPU, all otherwise)"
        ),
    )

    def __post_init__(self) -> None:
        runtimes = (self.runtimes,) if isinstance(self.runtimes, str) else tuple(self.runtimes)
        object.__setattr__(self, "runtimes", tuple(dict.fromkeys(r.strip() for r in runtimes if r.strip())))
        for name in ("inputs", "checkpoint", "base_model"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        if len(self.runtimes) < 2:
            raise MoeExportError(
                f"--runtimes {','.join(self.runtimes)}: name at least two runtimes (the first is the reference)"
            )
        if self.inputs is not None and (self.batch is not None or self.seq is not None):
            raise MoeExportError("--inputs and --batch/--seq are exclusive: the .npz fixes the shape")
        for value, minimum, option in (
            (self.batch, 1, "--batch"), (self.seq, 1, "--seq"), (self.atol, 0, "--atol"), (self.rtol, 0, "--rtol"),
            (self.new_tokens, 0, "--new-tokens"), (self.threads, 1, "--threads"),
        ):  # fmt: skip
            at_least(value, minimum, option)
        fraction(self.min_top1, "--min-top1")
        fraction(self.max_top1_drop, "--max-top1-drop")
        one_of(self.device, DEVICES, "--device")
        one_of(self.reference, REFERENCES, "--reference")
        if self.optimization is not None:
            one_of(self.optimization, OPTIMIZATION_LEVELS, "--optimization")

    def optimization_for(self, export_dtype: str) -> str:
        """The ORT optimisation level validate runs: the one asked for, else `basic` for an fp16 export on the CPU
        (at `all` ONNX Runtime's CPU provider stores fp16 weights converted to fp32, twice the export's size, while
        `basic` keeps them fp16, mapped from the external data file, and casts per op) and `all` otherwise."""
        if self.optimization is not None:
            return self.optimization
        return "basic" if export_dtype == "fp16" and self.device == "cpu" else "all"

    def shapes(self) -> list[tuple[int, int]] | None:
        """One (batch, seq) shape when either is given, else None (validate's default shapes)."""
        if self.batch is None and self.seq is None:
            return None
        return [(self.batch or 1, self.seq or DEFAULT_SEQ)]
