"""The GroupedLoRA function body (run by ONNX Runtime) equals the eager torch op, for any shapes and routings.

Legend: T tokens, K slots, E experts, E_A experts owning an A, R rank, D_in / D_out feature sizes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from moe_export.export.onnx_ops import custom_ops, function_bodies
from moe_export.ops.grouped_lora import grouped_lora
from moe_export.ops.names import DOMAIN, PLUGIN_ATTRIBUTES

OPSET = 20
ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}


def one_node_model(dtype: torch.dtype, gate_dtype: torch.dtype) -> bytes:
    """A model with a single moe_export::GroupedLoRA node (all five operands are graph inputs)."""
    t = ONNX_TYPES[dtype]
    inputs = [
        helper.make_tensor_value_info("x", t, ["T", "D_in"]),
        helper.make_tensor_value_info("expert_ids", TensorProto.INT64, ["T", "K"]),
        helper.make_tensor_value_info("gates", ONNX_TYPES[gate_dtype], ["T", "K"]),
        helper.make_tensor_value_info("A", t, ["E_A", "R", "D_in"]),
        helper.make_tensor_value_info("B", t, ["E", "D_out", "R"]),
    ]
    node = helper.make_node(
        "GroupedLoRA", [i.name for i in inputs], ["y"], domain=DOMAIN, name="unit", **PLUGIN_ATTRIBUTES
    )
    graph = helper.make_graph([node], "one_node", inputs, [helper.make_tensor_value_info("y", t, ["T", "D_out"])])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=function_bodies({"GroupedLoRA"}, OPSET),
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


_SESSIONS: dict[tuple[torch.dtype, torch.dtype], ort.InferenceSession] = {}


def session(dtype: torch.dtype, gate_dtype: torch.dtype = torch.float32) -> ort.InferenceSession:
    key = (dtype, gate_dtype)
    if key not in _SESSIONS:
        _SESSIONS[key] = ort.InferenceSession(one_node_model(*key), providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


@settings(max_examples=40, deadline=None)
@given(
    num_experts=st.integers(1, 6),
    data=st.data(),
    rank=st.integers(1, 4),
    num_tokens=st.integers(1, 9),
    d_in=st.integers(1, 8),
    d_out=st.integers(1, 8),
    shared_a=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_function_body_matches_eager_op(
    num_experts: int,
    data: st.DataObject,
    rank: int,
    num_tokens: int,
    d_in: int,
    d_out: int,
    shared_a: bool,
    dtype: torch.dtype,
    seed: int,
) -> None:
    slots = data.draw(st.integers(1, num_experts), label="K")
    # Routers emit fp32 gates; the reference hands them to the op in the model dtype (both must work).
    gate_dtype = data.draw(st.sampled_from([torch.float32, dtype]), label="gate dtype")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_in, generator=g).to(dtype)  # [T, D_in]
    # Repeated ids are allowed by the op (their gates add up); top-k routers never repeat.
    ids = torch.randint(0, num_experts, (num_tokens, slots), generator=g)  # [T, K]
    gates = torch.rand(num_tokens, slots, generator=g).to(gate_dtype)  # [T, K]
    a = torch.randn(1 if shared_a else num_experts, rank, d_in, generator=g).to(dtype)  # [E_A, R, D_in]
    b = torch.randn(num_experts, d_out, rank, generator=g).to(dtype)  # [E, D_out, R]
    want = grouped_lora(x.float(), ids, gates.float(), a.float(), b.float())  # [T, D_out] fp32 truth
    feeds = {"x": x.numpy(), "expert_ids": ids.numpy(), "gates": gates.numpy(), "A": a.numpy(), "B": b.numpy()}
    (got,) = session(dtype, gate_dtype).run(None, feeds)
    assert got.shape == (num_tokens, d_out) and got.dtype == x.numpy().dtype
    if dtype == torch.float32:
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    else:
        # fp16 operands: the body casts gates to fp16 and rounds its intermediates to fp16 (ORT CPU computes
        # each op in fp32 and casts back), so compare against the fp32 truth at fp16 resolution
        # scaled by the magnitude of the terms summed (|x||A| |B| grows with D_in, R, K).
        scale = float((x.float().abs() @ a.float().abs().amax(0).T).amax() * b.float().abs().amax() * rank * slots)
        np.testing.assert_allclose(got.astype(np.float32), want.numpy(), rtol=0, atol=4e-3 * max(scale, 1.0))


def test_repeated_ids_add_up() -> None:
    """Two slots on the same expert count twice (the ScatterElements reduction is 'add')."""
    x = torch.tensor([[1.0, 2.0]])
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [2, 1, 2]
    b = torch.tensor([[[1.0]], [[10.0]]])  # [2, 1, 1]
    feeds = {"x": x.numpy(), "expert_ids": np.array([[1, 1]]), "gates": np.array([[0.25, 0.5]], np.float32)}
    (got,) = session(torch.float32).run(None, {**feeds, "A": a.numpy(), "B": b.numpy()})
    np.testing.assert_allclose(got, [[15.0]])  # 0.75 * 10 * 2


def test_custom_op_table_rows_are_complete() -> None:
    """Every row names an op in our domain, has a schema of that name and a body that passes the checker."""
    rows = custom_ops()
    assert torch.ops.moe_export.grouped_lora.default in rows
    for row in rows.values():
        assert row.schema.name == row.name and row.schema.domain == DOMAIN
        body = row.body(OPSET)
        assert body.name == row.name and body.domain == DOMAIN
        assert set(body.attribute) == set(PLUGIN_ATTRIBUTES)


@pytest.mark.parametrize("opset", [18, 21])
def test_body_runs_at_other_opsets(opset: int) -> None:
    """The body is written in the model's own opset; the oldest supported and a newer one both run."""
    body = function_bodies({"GroupedLoRA"}, opset)[0]
    assert [o.version for o in body.opset_import if o.domain == ""] == [opset]


@pytest.mark.parametrize("shared_a", [False, True])
def test_zero_tokens_give_an_empty_output(shared_a: bool) -> None:
    """T = 0 (an empty batch) is a valid call of the eager op; the body must return [0, D_out], not fail on
    a Reshape whose -1 cannot be inferred from zero elements."""
    a = torch.randn(1 if shared_a else 3, 2, 4)  # [E_A, R, D_in]
    b = torch.randn(3, 5, 2)  # [E, D_out, R]
    x, ids, gates = torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    assert grouped_lora(x, ids, gates, a, b).shape == (0, 5)
    feeds = {"x": x.numpy(), "expert_ids": ids.numpy(), "gates": gates.numpy(), "A": a.numpy(), "B": b.numpy()}
    (got,) = session(torch.float32).run(None, feeds)
    assert got.shape == (0, 5)
