"""MixLoRA's block-level unit: the slots op, the FFNMoE reference vs a per-token loop, torch.export.

`LoopFFN` is the independent oracle for `FFNMoE` units (other tests import it): per token, in fp64,
written from docs/formats.md ("mixlora") and sharing no routing or op code with moe_export.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moe_export.ir import Adapter, ExpertStack, FFNMoE, Router
from moe_export.ops.grouped_lora_slots import grouped_lora_slots
from moe_export.reference.ffn import MoEFFN
from moe_export.reference.loading import load_base_model
from moe_export.reference.model import apply_adapter

# --------------------------------------------------------------------------- the slots op


def _slots_loop(x: torch.Tensor, ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], ids.shape[1], B.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            a = A[0 if A.shape[0] == 1 else e].double()
            out[t, k] = B[e].double() @ (a @ x[t].double())
    return out


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 6),
    slots=st.integers(1, 4),
    experts=st.integers(1, 5),
    rank=st.integers(1, 3),
    d_in=st.integers(1, 7),
    d_out=st.integers(1, 7),
    shared_a=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_slots_op_equals_loop(tokens, slots, experts, rank, d_in, d_out, shared_a, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g)
    ids = torch.randint(0, experts, (tokens, slots), generator=g)  # repeats allowed
    A = torch.randn(1 if shared_a else experts, rank, d_in, generator=g)
    B = torch.randn(experts, d_out, rank, generator=g)
    got = grouped_lora_slots(x, ids, A, B)
    assert got.shape == (tokens, slots, d_out)
    torch.testing.assert_close(got.double(), _slots_loop(x, ids, A, B), rtol=1e-5, atol=1e-5)


def test_slots_op_registration() -> None:
    """Schema, fake (meta) kernel and dynamic-shape tracing agree with the eager kernel."""
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(5, 6, generator=g), torch.randint(0, 3, (5, 2), generator=g),
            torch.randn(3, 2, 6, generator=g), torch.randn(3, 4, 2, generator=g))  # fmt: skip
    torch.library.opcheck(grouped_lora_slots, args, test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------- the per-token oracle


def _loop_select(router: Router, probs: torch.Tensor) -> dict[int, float]:
    """{expert: weight} for one token from fp64 probabilities, spelled out per docs/formats.md ("mixlora")."""
    order = sorted(range(probs.shape[0]), key=lambda e: -float(probs[e]))
    if router.select == "topk":
        chosen = order[: router.top_k]
        total = sum(float(probs[e]) for e in chosen)
        return {e: float(probs[e]) / total if router.renormalize else float(probs[e]) for e in chosen}
    assert router.select == "top_p"
    scaled = probs / router.temperature if router.temperature > 0 else probs
    kept, cumulative = {}, 0.0
    for e in order:  # experts while the cumulative mass stays <= p, plus the first one past it
        cumulative += float(scaled[e])
        kept[e] = float(scaled[e])
        if cumulative > router.top_p:
            break
    return kept


class LoopFFN(nn.Module):
    """out[t] = sum_e w_e down_e(act(gate_e(h_t)) * up_e(h_t)), proj_e(z) = W z + b + s_e B_e A_e z, in fp64."""

    def __init__(self, mlp: nn.Module, unit: FFNMoE) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.mlp, self.unit, self.act = mlp, unit, ACT2FN[unit.act_fn]

    def _proj(self, proj: str, expert: int, z: torch.Tensor) -> torch.Tensor:
        linear = getattr(self.mlp, proj)
        y = linear.weight.double() @ z
        if linear.bias is not None:
            y = y + linear.bias.double()
        stack = self.unit.experts.get(proj)
        if stack is not None:
            a = stack.A[0 if stack.A.shape[0] == 1 else expert].double()
            y = y + float(stack.scaling[expert]) * (stack.B[expert].double() @ (a @ z))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).double()
        out = torch.zeros_like(flat)
        router = self.unit.router
        for t in range(flat.shape[0]):
            h = flat[t]
            probs = torch.softmax(router.weight.double() @ h, dim=0)
            for e, w in _loop_select(router, probs).items():
                hidden = self.act(self._proj("gate_proj", e, h)) * self._proj("up_proj", e, h)
                out[t] += w * self._proj("down_proj", e, hidden)
        return out.view(x.shape).to(x.dtype)


def apply_loop_ffn(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Replace FFNMoE units with LoopFFN and linear units with the shared LoopLinear oracle."""
    from tests.loop_reference import LoopLinear

    for unit in adapter.units:
        parent_name, _, child = unit.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        setattr(parent, child, LoopFFN(base, unit) if isinstance(unit, FFNMoE) else LoopLinear(base, unit, None))
    return model


# --------------------------------------------------------------------------- synthetic FFN units

SHAPES = {"gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}  # tests/tiny.py Llama


def ffn_adapter(router_kwargs: dict, projections: tuple[str, ...] = tuple(SHAPES), act_fn: str = "silu") -> Adapter:
    g = torch.Generator().manual_seed(11)
    num_experts, rank = 4, 2
    units = []
    for layer in range(2):
        experts = {
            proj: ExpertStack(
                torch.randn(num_experts, rank, SHAPES[proj][0], generator=g) * 0.3,
                torch.randn(num_experts, SHAPES[proj][1], rank, generator=g) * 0.3,
                torch.rand(num_experts, generator=g) + 0.5,
            )
            for proj in projections
        }
        router = Router("linear", num_experts, weight=torch.randn(num_experts, 32, generator=g), **router_kwargs)
        units.append(FFNMoE(f"model.layers.{layer}.mlp", "llama_gated", act_fn, router, experts))
    return Adapter("canonical", units)


ROUTERS = {
    "top2": {"select": "topk", "top_k": 2, "renormalize": True},
    "top1": {"select": "topk", "top_k": 1, "renormalize": True},
    "top_p": {"select": "top_p", "top_p": 0.6},
    "top_p-temperature": {"select": "top_p", "top_p": 0.7, "temperature": 0.8},
}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_ffn_reference_matches_loop(tiny_base, router: str) -> None:
    adapter = ffn_adapter(ROUTERS[router])
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    got = _logits(apply_adapter(load_base_model(tiny_base), adapter), ids)
    want = _logits(apply_loop_ffn(load_base_model(tiny_base), adapter), ids)
    base = _logits(load_base_model(tiny_base), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-2, "the FFN experts must change the logits"


def test_ffn_partial_projections_and_config_activation(tiny_base) -> None:
    """An un-adapted up_proj is the plain base projection in every expert; act_fn comes from the unit."""
    adapter = ffn_adapter(ROUTERS["top2"], projections=("gate_proj", "down_proj"), act_fn="gelu")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    got = _logits(apply_adapter(load_base_model(tiny_base), adapter), ids)
    want = _logits(apply_loop_ffn(load_base_model(tiny_base), adapter), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    silu = _logits(
        apply_adapter(load_base_model(tiny_base), ffn_adapter(ROUTERS["top2"], ("gate_proj", "down_proj"))), ids
    )
    assert (silu - got).abs().max() > 1e-3, "the configured activation must be the one used"


def test_top_p_without_experts_scales_base_mlp_by_kept_mass(tiny_base) -> None:
    """docs/formats.md ("mixlora"): with all B = 0 the dynamic block is the base MLP times the kept probability mass."""
    adapter = ffn_adapter(ROUTERS["top_p"])
    for unit in adapter.units:
        for stack in unit.experts.values():
            stack.B.zero_()
    model = load_base_model(tiny_base)
    mlp = model.model.layers[0].mlp
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(8))
    unit = adapter.units[0]
    block = MoEFFN(mlp, unit, mlp.act_fn)
    probs = torch.softmax(x @ unit.router.weight.T, dim=-1)
    sorted_p, _ = probs.sort(dim=-1, descending=True)
    kept = torch.cat([torch.ones(5, 1, dtype=torch.bool), sorted_p.cumsum(-1)[:, :-1] <= 0.6], dim=-1)
    mass = (sorted_p * kept).sum(-1, keepdim=True)  # [T, 1]
    with torch.no_grad():
        torch.testing.assert_close(block(x), mass * mlp(x), rtol=1e-5, atol=1e-6)
    assert float(mass.min()) < 0.99, "the test needs tokens whose kept mass is below 1"


def test_ffn_block_exports_without_data_dependent_loops(tiny_base) -> None:
    """torch.export sees three opaque slots ops per block (gate, up, down) and a dynamic token count."""
    adapter = ffn_adapter(ROUTERS["top2"])
    model = load_base_model(tiny_base)
    apply_adapter(model, adapter)
    block = model.model.layers[0].mlp
    assert isinstance(block, MoEFFN)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5))
    dims = {0: torch.export.Dim("batch", min=1, max=16), 1: torch.export.Dim("seq", min=1, max=64)}
    program = torch.export.export(block, (x,), dynamic_shapes=({0: dims[0], 1: dims[1]},))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.moe_export.grouped_lora_slots.default) == 3
    other = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), block(other), rtol=1e-6, atol=1e-6)


def test_ffn_unit_round_trips_canonical_layout(tiny_base, tmp_path) -> None:
    adapter = ffn_adapter(ROUTERS["top_p-temperature"], projections=("up_proj", "down_proj"))
    again = Adapter.load(adapter.save(tmp_path / "ffn"))
    unit, back = adapter.units[1], again.units[1]
    assert isinstance(back, FFNMoE) and sorted(back.experts) == ["down_proj", "up_proj"]
    assert (back.router.select, back.router.top_p, back.act_fn) == (unit.router.select, unit.router.top_p, unit.act_fn)
    assert torch.equal(back.router.weight, unit.router.weight)
    ids = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(7))
    a = _logits(apply_adapter(load_base_model(tiny_base), adapter), ids)
    b = _logits(apply_adapter(load_base_model(tiny_base), again), ids)
    assert torch.equal(a, b)
    assert math.isclose(back.router.temperature, 0.8)


# --------------------------------------------------------------------------- the ONNX function body


def _slots_node_session() -> object:
    """ONNX Runtime session of one bare moe_export::GroupedLoRASlots node plus its model-local body."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from moe_export.export.onnx_ops import function_bodies
    from moe_export.ops.names import DOMAIN, PLUGIN_ATTRIBUTES

    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("x", f32, ["T", "D_in"]),
        helper.make_tensor_value_info("expert_ids", TensorProto.INT64, ["T", "K"]),
        helper.make_tensor_value_info("A", f32, ["E_A", "R", "D_in"]),
        helper.make_tensor_value_info("B", f32, ["E", "D_out", "R"]),
    ]
    node = helper.make_node("GroupedLoRASlots", [i.name for i in inputs], ["y"], domain=DOMAIN, **PLUGIN_ATTRIBUTES)
    output = helper.make_tensor_value_info("y", f32, ["T", "K", "D_out"])
    model = helper.make_model(
        helper.make_graph([node], "slots", inputs, [output]),
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
        functions=function_bodies({"GroupedLoRASlots"}, 20),
    )
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def slots_session() -> object:
    return _slots_node_session()


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(0, 5),  # T = 0 included: the body must not infer a -1 from zero elements
    slots=st.integers(1, 4),
    experts=st.integers(1, 4),
    rank=st.integers(1, 3),
    shared_a=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_slots_function_body_in_onnxruntime(slots_session, tokens, slots, experts, rank, shared_a, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 6, generator=g)
    ids = torch.randint(0, experts, (tokens, slots), generator=g)
    A = torch.randn(1 if shared_a else experts, rank, 6, generator=g)
    B = torch.randn(experts, 5, rank, generator=g)
    feeds = {"x": x.numpy(), "expert_ids": ids.numpy(), "A": A.numpy(), "B": B.numpy()}
    (got,) = slots_session.run(None, feeds)
    torch.testing.assert_close(torch.from_numpy(got), grouped_lora_slots(x, ids, A, B), rtol=1e-5, atol=1e-5)
