"""The token order a contrib-op decoder runs its units in, owned once for the graph and for whoever reads its taps.

GroupQueryAttention (export/decoder_fused.py) takes a row's real tokens to be the first ones of its cache, so the
contrib decoder rotates each left-padded row's new tokens so its real ones come first, runs every layer (and so
every GroupedLoRA unit) in that order, and rotates the hidden states back before lm_head. The logits come out in
the caller's order; per-unit taps (runtimes/taps.py) do not, and validation maps them back with `caller_order`,
the same rotation the graph traces. Legend: B batch, S new tokens, P past + S mask columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_export.export.options import FUSION_CONTRIB


def left_pad_rotation(attention_mask: Any, sequence: int) -> tuple[Any, Any]:
    """[B, S] gather indices (torch) that move each row's leading pads (zeros at the start of the mask's last S
    columns) to its end, and the inverse. Unpadded and right-padded rows (no leading zeros) keep their order.

    Traced into the contrib decoder, so written in ops ONNX has for a symbolic S."""
    import torch

    new = attention_mask[:, attention_mask.shape[1] - sequence :]  # [B, S]
    pads = (new.cumsum(-1) == 0).sum(-1, keepdim=True)  # [B, 1]
    steps = torch.arange(sequence, device=attention_mask.device)[None]
    forward, back = steps + pads, steps - pads  # modulo S, written with Where (ONNX has no Mod by a SymInt)
    return torch.where(forward >= sequence, forward - sequence, forward), torch.where(back < 0, back + sequence, back)


def rotates_tokens(fusion: dict[str, Any] | None) -> bool:
    """Whether an export's graph (its export.json `fusion` record) runs its units on rotated tokens."""
    return (fusion or {}).get("mode") == FUSION_CONTRIB


def caller_order(attention_mask: np.ndarray, sequence: int) -> np.ndarray | None:
    """[B, S] indices: position s of a row in the caller's order is position order[b, s] of the row the units saw
    in a contrib decoder fed this mask [B, P]. None when no row is left-padded (the units saw the caller's order)."""
    import torch

    _, back = left_pad_rotation(torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)), sequence)
    order = back.numpy()
    return None if (order == np.arange(sequence)[None]).all() else order
