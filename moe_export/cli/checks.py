"""Option checks every command runs before any model loads: a bad option costs the user no waiting and is
never hidden behind an error that loading would raise first."""

from __future__ import annotations

from pathlib import Path

from moe_export.config import at_least, fraction, one_of, top_k_values
from moe_export.errors import MoeExportError
from moe_export.files import check_not_input, check_writable

__all__ = ["at_least", "fraction", "input_dir", "one_of", "top_k_values", "writable_files"]


def writable_files(*outputs: tuple[Path | None, str]) -> None:
    """Every (path, option) output file that is given can be written: checked before the work, not after."""
    for path, option in outputs:
        if path is not None:
            check_writable(path, option)


def outputs_apart(outputs: list[tuple[Path | None, str]], inputs: list[Path | None]) -> None:
    """No (path, option) output given is an input of the command or lies inside an input directory."""
    for path, option in outputs:
        if path is not None:
            check_not_input(path, option, list(inputs))


def input_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise MoeExportError(f"{path}: {what} not found")
    if not path.is_dir():
        raise MoeExportError(f"{path}: {what} is a file; expected a directory")
