"""Option checks every command runs before any model loads: a bad option costs the user no waiting and is
never hidden behind an error that loading would raise first."""

from __future__ import annotations

from pathlib import Path

from moe_export.errors import MoeExportError
from moe_export.files import check_not_input, check_writable


def at_least(value: int | float | None, minimum: float, option: str) -> None:
    if value is not None and not value >= minimum:
        raise MoeExportError(f"{option} {value}: must be >= {minimum:g}")


def fraction(value: float | None, option: str) -> None:
    """A share in [0, 1] (agreement thresholds)."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise MoeExportError(f"{option} {value}: must be between 0 and 1")


def one_of(value: str, choices: tuple[str, ...], option: str) -> None:
    if value not in choices:
        raise MoeExportError(f"{option} {value!r}: expected one of {', '.join(choices)}")


def top_k_values(value: int | list[int] | None) -> None:
    """--top-k is >= 1 everywhere; its upper bound (the experts of each layer) is checked when the adapter is read."""
    for k in [value] if isinstance(value, int) else value or []:
        if k < 1:
            raise MoeExportError(f"--top-k {k}: each router selects at least 1 expert")


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
