"""The tokenizer of a model directory (a base model, or an export, which carries copies of its files): one
loader for calibration text and for generation from a text prompt. Offline: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_export.errors import FormatError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(directory: str | Path, needed_for: str | None = None) -> Any | None:
    """`directory`'s transformers tokenizer; None when it has no tokenizer files, or, when `needed_for` says
    what needs one, a one-line FormatError. Files that are there but do not load are always a FormatError."""
    directory = Path(directory)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        if needed_for is not None:
            raise FormatError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); {needed_for}")
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here (OSError, ValueError, KeyError, TypeError...)
        first = (str(exc).splitlines() or [""])[0][:160]
        raise FormatError(f"{directory}: tokenizer files are present but cannot be loaded ({first})") from exc
