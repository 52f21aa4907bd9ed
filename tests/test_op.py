"""`moe_export::grouped_lora` eager vs a per-token loop, for any shapes and routings (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_export.ops.grouped_lora import grouped_lora


def loop_grouped_lora(x, expert_ids, gates, A, B) -> torch.Tensor:
    """y[t] = sum_j gates[t, j] B[e] (A[e or 0] x[t]), one token and one slot at a time, in float64."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[t, j])
            a = A[0 if A.shape[0] == 1 else e].double()
            out[t] += float(gates[t, j]) * (B[e].double() @ (a @ x[t].double()))
    return out


@st.composite
def op_inputs(draw: st.DrawFn):
    num_experts = draw(st.integers(1, 6))
    k = draw(st.integers(1, num_experts + 2))  # k > E forces repeated ids in a row
    rank, tokens = draw(st.integers(1, 4)), draw(st.integers(0, 9))
    d_in, d_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    shared_a, repeat = draw(st.booleans()), draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(tokens, d_in, generator=g)
    ids = torch.randint(0, num_experts, (tokens, k), generator=g)
    if repeat and k > 1:
        ids[:, 1] = ids[:, 0]  # the same expert twice in one token: its gates add up
    gates = torch.rand(tokens, k, generator=g)
    A = torch.randn(1 if shared_a else num_experts, rank, d_in, generator=g)
    B = torch.randn(num_experts, d_out, rank, generator=g)
    return x, ids, gates, A, B


@settings(max_examples=60, deadline=None)
@given(op_inputs())
def test_grouped_lora_equals_loop(inputs) -> None:
    x, ids, gates, A, B = inputs
    got = grouped_lora(x, ids, gates, A, B)  # [T, D_out]
    assert got.shape == (x.shape[0], B.shape[1]) and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), loop_grouped_lora(x, ids, gates, A, B), rtol=1e-5, atol=1e-5)


def test_zero_gates_give_zero() -> None:
    x, A, B = torch.randn(5, 8), torch.randn(3, 2, 8), torch.randn(3, 4, 2)
    ids = torch.zeros(5, 2, dtype=torch.long)
    assert torch.equal(grouped_lora(x, ids, torch.zeros(5, 2), A, B), torch.zeros(5, 4))


def test_fake_implementation_gives_shapes_only() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, ids, gates = torch.empty(7, 8), torch.zeros(7, 2, dtype=torch.long), torch.empty(7, 2)
        out = grouped_lora(x, ids, gates, torch.empty(3, 2, 8), torch.empty(3, 5, 2))
    assert tuple(out.shape) == (7, 5)
