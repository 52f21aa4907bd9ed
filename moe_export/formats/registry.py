"""Family registry: each family is one class in formats/<family>.py, registered with `@register`.

Facts are class attributes (how the family is recognised, its default top-k, whether it saves top-k);
code is `load()`. Lookup and detection over every registered family: `detection.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from moe_export.formats.base_weights import BaseWeights
from moe_export.formats.checkpoint import Checkpoint
from moe_export.ir import Adapter


@dataclass
class LoadOptions:
    """User choices a loader may need (CLI flags map onto these fields)."""

    top_k: int | list[int] | None = field(
        default=None, metadata={"help": "top-k of every top-k router, or one per decoder layer; refused without one"}
    )
    task_id: int | None = field(
        default=None, metadata={"help": "task id for a task gate (MOELoRA); refused without one"}
    )


class Family:
    """One checkpoint family. Subclasses set the facts and implement `load`."""

    name: ClassVar[str]
    title: ClassVar[str]  # how people call it, for tables and messages
    source: ClassVar[str] = ""  # the code base whose layout this reads
    peft_types: ClassVar[tuple[str, ...]] = ()  # adapter_config.json peft_type values that may mean this family
    peft_type_required: ClassVar[bool] = True  # False: a config without peft_type is decided by the keys alone
    key_patterns: ClassVar[tuple[str, ...]] = ()  # regexes; every one must match some tensor key
    forbidden_patterns: ClassVar[tuple[str, ...]] = ()  # regexes that must match no key
    specificity: ClassVar[int] = 10  # among several matches, the highest wins
    default_top_k: ClassVar[int | None] = None  # top-k when the checkpoint does not say
    top_k_saved: ClassVar[bool] = True  # False: the checkpoint never records top-k (MoLA); a notice says so
    needs_base_weights: ClassVar[bool] = False  # load() reads base weights (GOAT's SVD correction)

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        peft_type = ckpt.config_value("peft_type")
        type_matters = peft_type is not None or cls.peft_type_required
        if cls.peft_types and type_matters and str(peft_type or "").upper() not in cls.peft_types:
            return False
        if ckpt.weights_path is None:
            return False
        if not all(ckpt.has_key(p) for p in cls.key_patterns):
            return False
        return not any(ckpt.has_key(p) for p in cls.forbidden_patterns)

    @classmethod
    def load(cls, ckpt: Checkpoint, options: LoadOptions, base: BaseWeights | None) -> Adapter:
        raise NotImplementedError


FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    if cls.name in FAMILIES:
        raise ValueError(f"family {cls.name} registered twice")
    FAMILIES[cls.name] = cls
    return cls
