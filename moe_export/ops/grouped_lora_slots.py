"""`moe_export::grouped_lora_slots`: per-slot LoRA expert outputs, for block-level MoEs (MixLoRA).

Legend: T tokens, K slots per token, E experts, E_A experts owning an A (E or 1), R rank,
D_in / D_out feature sizes.

    y[t, k] = B[e] @ (A[e or 0] @ x[t]),   e = expert_ids[t, k]          y: [T, K, D_out]

Unlike `grouped_lora` the slots are not summed: MixLoRA applies the activation between the
up/gate and down projections of each selected expert, so the block needs every slot's output.
A down projection whose input differs per slot is the same op on T*K rows with K = 1.
Scaling is already folded into B. The op is opaque to torch.export, like `grouped_lora`.
"""

from __future__ import annotations

import torch


def slot_onehot(expert_ids: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, K, E] one-hot rows: slot k of token t selects expert expert_ids[t, k]."""
    experts = torch.arange(num_experts, device=expert_ids.device)  # [E]
    return (expert_ids[:, :, None] == experts).to(dtype)  # [T, K, E]


def grouped_lora_slots_dense(
    x: torch.Tensor, expert_ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """The exact dense decomposition ((x A_cat^T) * onehot) B_cat, also the ONNX function body's math.

    Multiplying by a one-hot mask selects exactly (x * 1 and x * 0 are exact), so the per-slot
    result equals B[e] A[e] x bit for bit up to the order of the rank-sized sums.
    """
    num_tokens, num_slots = expert_ids.shape
    num_experts, d_out, rank = B.shape
    mask = slot_onehot(expert_ids, num_experts, x.dtype)  # [T, K, E]
    a_cat = A.reshape(A.shape[0] * rank, A.shape[2])  # [E_A*R, D_in]
    h = (x @ a_cat.T).view(num_tokens, 1, A.shape[0], rank)  # [T, 1, E_A, R]
    hk = h * mask[:, :, :, None]  # [T, K, E, R]; an E_A = 1 row broadcasts over E
    b_cat = B.permute(0, 2, 1).reshape(num_experts * rank, d_out)  # [E*R, D_out]
    return hk.reshape(num_tokens, num_slots, num_experts * rank) @ b_cat  # [T, K, D_out]


def _check(x: torch.Tensor, expert_ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    torch._check(x.dim() == 2, lambda: f"grouped_lora_slots: x must be [T, D_in], got {tuple(x.shape)}")
    torch._check(expert_ids.dim() == 2, lambda: "grouped_lora_slots: expert_ids must be [T, K]")
    torch._check(A.dim() == 3 and B.dim() == 3, lambda: "grouped_lora_slots: A [E_A, R, D_in], B [E, D_out, R]")
    torch._check(
        A.shape[2] == x.shape[1] and A.shape[1] == B.shape[2], lambda: "grouped_lora_slots: A/B/x do not chain"
    )


@torch.library.custom_op("moe_export::grouped_lora_slots", mutates_args=())
def grouped_lora_slots(x: torch.Tensor, expert_ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Per-slot LoRA expert outputs, x [T, D_in] -> [T, K, D_out]; see the module docstring."""
    _check(x, expert_ids, A, B)
    return grouped_lora_slots_dense(x, expert_ids, A, B)


@grouped_lora_slots.register_fake
def _grouped_lora_slots_fake(
    x: torch.Tensor, expert_ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    _check(x, expert_ids, A, B)
    return x.new_empty((x.shape[0], expert_ids.shape[1], B.shape[1]))
