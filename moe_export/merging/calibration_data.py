"""Which tokens a calibration run takes: the text (a `--data` file, one sample per line; else the built-in text,
or seeded random tokens for a base without a tokenizer), split into the calibration and held-out halves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_export.config import existing_file
from moe_export.errors import FormatError
from moe_export.merging.options import CalibrateOptions, check_calibration_sizes
from moe_export.reference.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from moe_export.reference.loading import LoadedAdapter


def read_lines(data: str | Path) -> list[str]:
    path = Path(data)
    existing_file(path, "--data", "calibration text file")  # CalibrateOptions checked it before the load; gone since?
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: calibration data is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not lines:
        raise FormatError(f"{path}: calibration data file has no non-empty line")
    return lines


@dataclass(frozen=True)
class CalibrationSet:
    """Which calibration tokens a run takes: the text (a file, one sample per line; None: the built-in text, or
    seeded random tokens when the base has no tokenizer), how many samples of at most `seq_len` tokens, and the
    seed of their order. One value for calibration and the held-out check, which take its two halves."""

    data: str | Path | None = None
    samples: int = 32
    seq_len: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_calibration_sizes(self.samples, self.seq_len)

    @classmethod
    def from_options(cls, options: CalibrateOptions) -> CalibrationSet:
        return cls(options.data, options.samples, options.seq_len, options.seed)


def calibration_inputs(
    loaded: LoadedAdapter,
    calib: CalibrationSet,
    split: str = "stats",
    vocab: int | None = None,
) -> tuple[list[torch.Tensor], str]:
    """Token id samples ([1, L] each) and a description of their source.

    Lines are shuffled with the seed; the 'stats' split takes even positions, 'heldout' odd ones, so a
    merge is measured on text its statistics never saw. Without a tokenizer: seeded random tokens
    (another seed for the held-out split). `vocab` is needed when `loaded` has no model (a streamed reference)."""
    data = calib.data
    if vocab is None:
        vocab = int(loaded.model.get_input_embeddings().num_embeddings)
    tokenizer = load_tokenizer(loaded.base_model_path)
    if tokenizer is None:
        if data is not None:
            raise FormatError(f"{loaded.base_model_path}: no tokenizer files, so --data {data} cannot be tokenized")
        g = torch.Generator().manual_seed(calib.seed if split == "stats" else calib.seed + 7919)
        ids = torch.randint(0, vocab, (calib.samples, calib.seq_len), generator=g)  # [N, L]
        return [row[None] for row in ids], "random"
    lines = read_lines(data) if data is not None else _builtin()
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(calib.seed)).tolist()
    picked = [lines[i] for i in order[(0 if split == "stats" else 1) :: 2]][: calib.samples]
    source = str(data) if data is not None else "builtin"
    if not picked:
        raise FormatError(f"{source}: {len(lines)} line(s) leave no '{split}' split; give at least 2 lines")
    out = []
    for line in picked:
        ids = tokenizer(line).input_ids[: calib.seq_len]
        if not ids:
            continue
        if max(ids) >= vocab:
            raise FormatError(f"{loaded.base_model_path}: tokenizer gives id {max(ids)} >= the model's vocab {vocab}")
        out.append(torch.tensor(ids, dtype=torch.long)[None])  # [1, L]
    return out, source


def _builtin() -> list[str]:
    from moe_export.merging.calibration_text import builtin_lines

    return builtin_lines()
