"""`moe_export::grouped_lora`: routed LoRA experts as one opaque op.

Legend: T tokens, K slots per token, E experts, E_A experts owning an A (E or 1), R rank,
D_in / D_out feature sizes.

    y[t] = sum_j gates[t, j] * B[e] @ (A[e or 0] @ x[t]),   e = expert_ids[t, j]

Scaling is already folded into B. The op is opaque to torch.export (its fake implementation only
knows shapes), so the data-dependent routing never becomes a Python loop in the exported graph.
"""

from __future__ import annotations

import torch


def dense_gates(expert_ids: torch.Tensor, gates: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Scatter K (expert, gate) pairs per token into a dense [T, E] gate matrix (repeated ids add up)."""
    dense = torch.zeros(expert_ids.shape[0], num_experts, dtype=dtype, device=gates.device)  # [T, E]
    return dense.scatter_add(1, expert_ids, gates.to(dtype))


def grouped_lora_dense(
    x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """The exact dense decomposition ((x A_cat^T) * expand(g)) B_cat, also the ONNX function body's math."""
    num_tokens = x.shape[0]
    num_experts, d_out, rank = B.shape
    g = dense_gates(expert_ids, gates, num_experts, x.dtype)  # [T, E]
    if A.shape[0] == 1:
        h = x @ A[0].T  # [T, R]: one A shared by every expert (HydraLoRA)
        hg = g[:, :, None] * h[:, None, :]  # [T, E, R]
    else:
        a_cat = A.reshape(num_experts * rank, A.shape[2])  # [E*R, D_in]
        hg = (x @ a_cat.T).view(num_tokens, num_experts, rank) * g[:, :, None]  # [T, E, R]
    b_cat = B.permute(0, 2, 1).reshape(num_experts * rank, d_out)  # [E*R, D_out]
    return hg.reshape(num_tokens, num_experts * rank) @ b_cat  # [T, D_out]


def _check(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    torch._check(x.dim() == 2, lambda: f"grouped_lora: x must be [T, D_in], got {tuple(x.shape)}")
    torch._check(expert_ids.dim() == 2 and gates.shape == expert_ids.shape, lambda: "grouped_lora: ids/gates [T, K]")
    torch._check(A.dim() == 3 and B.dim() == 3, lambda: "grouped_lora: A [E_A, R, D_in], B [E, D_out, R]")
    torch._check(A.shape[2] == x.shape[1] and A.shape[1] == B.shape[2], lambda: "grouped_lora: A/B/x do not chain")


@torch.library.custom_op("moe_export::grouped_lora", mutates_args=())
def grouped_lora(
    x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """Routed LoRA experts, [T, D_in] -> [T, D_out]; see the module docstring."""
    _check(x, expert_ids, gates, A, B)
    return grouped_lora_dense(x, expert_ids, gates, A, B)


@grouped_lora.register_fake
def _grouped_lora_fake(
    x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    _check(x, expert_ids, gates, A, B)
    return x.new_empty((x.shape[0], B.shape[1]))
