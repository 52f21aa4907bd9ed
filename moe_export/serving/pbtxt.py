"""Protobuf text format for Triton's config.pbtxt, from nested Python values.

A message is a list of (field, value) pairs (a field may repeat); a value is a message, a str (quoted), an
`Enum` (bare identifier), a bool or a number. Comments ("# ...") are allowed: protobuf's parser skips them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Union

Value = Union["Message", "Enum", str, bool, int, float]
Message = list[tuple[str, Value]]


@dataclass(frozen=True)
class Enum:
    """An enum value, written without quotes (TYPE_INT64, KIND_CPU)."""

    name: str


def render(message: Message, indent: int = 0) -> str:
    pad = "  " * indent
    lines = []
    for name, value in message:
        if name == "#":
            lines.append(f"{pad}# {value}")
        elif isinstance(value, list):
            lines.append(f"{pad}{name} {{")
            lines.append(render(value, indent + 1))
            lines.append(f"{pad}}}")
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


def _scalar(value: Value) -> str:
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid text-format string literal
    return str(value)


def parameters(values: dict[str, str]) -> list[tuple[str, Value]]:
    """Triton's `parameters` map: one `parameters { key, value { string_value } }` entry per key."""
    return [("parameters", [("key", k), ("value", [("string_value", v)])]) for k, v in values.items()]
