"""The reference with substituted base weights: e.g. an int4 export's dequantized weights, so that parity checks
the export's arithmetic against the same weights, and the quantization's cost is measured on its own."""

from __future__ import annotations

import torch
from torch import nn

from moe_export.errors import FormatError
from moe_export.ir.adapter import Adapter
from moe_export.reference.model import MoELoRALinear


@torch.no_grad()
def substitute_base_weights(model: nn.Module, adapter: Adapter | None, weights: dict[str, torch.Tensor]) -> None:
    """Replace the weight of each nn.Linear ([out, in]) or nn.Embedding named in `weights` by the given tensor,
    in place.

    A base inside a MoELoRALinear with always-on (shared) LoRAs stands for W + the shared LoRAs: the export
    folded them before quantizing, so the shared branch is folded first and then the sum replaced. Each
    weight becomes a new Parameter, so a tied lm_head no longer shares the embedding's storage."""
    for name, weight in weights.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise FormatError(f"substituted weight {name}: the reference model has no such module") from exc
        # nn.Embedding: an int4 export's embedding table ([vocab, hidden], export/quantize.py)
        if not isinstance(linear, (nn.Linear, nn.Embedding)) or tuple(linear.weight.shape) != tuple(weight.shape):
            shape = tuple(getattr(getattr(linear, "weight", None), "shape", ()))
            raise FormatError(
                f"substituted weight {name}: {tuple(weight.shape)} does not fit {type(linear).__name__} {shape}"
            )
        parent_name = name.rsplit(".", 1)[0] if name.endswith(".base") else None
        parent = model.get_submodule(parent_name) if parent_name else None
        if isinstance(parent, MoELoRALinear) and parent.shared_scalings:
            if adapter is None:
                raise FormatError(f"substituted weight {name}: its shared LoRAs need the adapter to fold")
            parent.fold_shared_into_base(adapter.unit(parent_name))  # type: ignore[arg-type]
        linear.weight = nn.Parameter(weight.to(linear.weight.dtype).contiguous(), requires_grad=False)
