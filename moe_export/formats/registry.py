"""Family registry: each family is one class in formats/<family>.py, registered with `@register`.

Facts are class attributes (how the family is recognised: its `Signature`; its default top-k, whether it
saves top-k); code is `load()`. Lookup and detection over every registered family: `detection.py`.
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


@dataclass(frozen=True)
class Signature:
    """How a checkpoint shows its family: the adapter_config.json peft_type and the tensor keys it holds."""

    peft_types: tuple[str, ...] = ()  # peft_type values that may mean the family (upper case)
    keys: tuple[str, ...] = ()  # regexes; every one must match some tensor key
    forbidden: tuple[str, ...] = ()  # regexes that must match no key
    peft_type_required: bool = True  # False: a config without peft_type is decided by the keys alone

    def matches(self, ckpt: Checkpoint) -> bool:
        peft_type = ckpt.config_value("peft_type")
        type_matters = peft_type is not None or self.peft_type_required
        if self.peft_types and type_matters and str(peft_type or "").upper() not in self.peft_types:
            return False
        if ckpt.weights_path is None:
            return False
        if not all(ckpt.has_key(p) for p in self.keys):
            return False
        return not any(ckpt.has_key(p) for p in self.forbidden)


class Family:
    """One checkpoint family. Subclasses set the facts that differ from these defaults and implement `load`."""

    name: ClassVar[str]
    title: ClassVar[str]  # how people call it, for tables and messages
    signature: ClassVar[Signature]
    # Among several matches the highest wins: a MoE family (20) over plain LoRA (5), canonical (100) over all.
    specificity: ClassVar[int] = 20
    default_top_k: ClassVar[int | None] = None  # top-k when the checkpoint does not say
    top_k_saved: ClassVar[bool] = True  # False: the checkpoint never records top-k (MoLA); a notice says so
    needs_base_weights: ClassVar[bool] = False  # load() reads base weights (GOAT's SVD correction)

    @classmethod
    def detect(cls, ckpt: Checkpoint) -> bool:
        return cls.signature.matches(ckpt)

    @classmethod
    def load(cls, ckpt: Checkpoint, base: BaseWeights | None) -> Adapter:
        """The checkpoint as read; load options (top-k, task id) are applied after, by reference/loading.py."""
        raise NotImplementedError


FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    if cls.name in FAMILIES:
        raise ValueError(f"family {cls.name} registered twice")
    FAMILIES[cls.name] = cls
    return cls
