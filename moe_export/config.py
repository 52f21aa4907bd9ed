"""Options as data: the base of every command's options dataclass, and the value checks they share.

Each command's settings are a frozen dataclass (ExportOptions in export/options.py, CalibrateOptions and
MergeOptions in merging/options.py, ValidateOptions in validation/options.py): one field per CLI flag, a help
text in the field's metadata, values checked in `__post_init__` (before anything loads), and a JSON round trip
(`to_dict` / `from_dict`). A key this version does not know was written by a newer moe-export: `from_dict`
refuses it with a message naming it, rather than silently running with different settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from moe_export.errors import FormatError, MoeExportError

T = TypeVar("T", bound="Options")


class Options:
    """Mixin for a frozen options dataclass: JSON round trip, `replace`, nested options by `NESTED`."""

    NESTED: ClassVar[dict[str, type[Options]]] = {}  # field -> options class of a nested value (or None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Options):
                value = value.to_dict()
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
        where = where or cls.__name__
        if not isinstance(data, Mapping):
            raise MoeExportError(f"{where}: expected a JSON object of {cls.__name__} fields")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise MoeExportError(
                f"{where}: unknown {cls.__name__} keys {unknown} (written by a newer moe-export?); known: {', '.join(names)}"
            )
        kept = dict(data)
        for name, nested in cls.NESTED.items():
            if isinstance(kept.get(name), Mapping):
                kept[name] = nested.from_dict(kept[name], f"{where}.{name}")
        for name in names:
            if isinstance(kept.get(name), list):
                kept[name] = tuple(kept[name])
        try:
            return cls(**kept)
        except TypeError as exc:
            raise MoeExportError(f"{where}: not valid {cls.__name__} ({exc})") from None

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


def help_text(help: str) -> dict[str, str]:
    """A field's metadata: its help text (the CLI flag's help says the same)."""
    return {"help": help}


# ---------------------------------------------------------------- value checks (one line, naming the flag)


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


def top_k_values(value: int | tuple[int, ...] | list[int] | None) -> None:
    """--top-k is >= 1 everywhere; its upper bound (the experts of each layer) is checked when the adapter is read."""
    for k in [value] if isinstance(value, int) else value or []:
        if k < 1:
            raise MoeExportError(f"--top-k {k}: each router selects at least 1 expert")


def existing_file(path: str | Path | None, option: str, what: str) -> None:
    """An input file that must exist (e.g. --data calibration text), checked before anything loads."""
    if path is not None and not Path(path).is_file():
        raise FormatError(f"{option} {path}: {what} not found")
