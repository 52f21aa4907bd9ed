"""The comparator (validation/parity.py) and the per-unit routing statistics (validation/units.py) on synthetic arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_export.runtimes.taps import UnitCapture, match_unit, node_index
from moe_export.validation.margins import Decision, margins_and_bounds
from moe_export.validation.parity import Tolerance, compare_func
from moe_export.validation.units import TokenLayout, UnitComparison, judge_flips, selection_mask


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 5, 11)).astype(np.float32)


def test_identical_outputs_pass(logits: np.ndarray) -> None:
    result = compare_func(atol=0, rtol=1e-6)({"logits": logits}, {"logits": logits.copy()})
    assert result and result.passed
    out = result.outputs["logits"]
    assert out.max_abs == 0 and out.top1_agreement == 1.0
    assert result.failures() == []
    json.dumps(result.to_dict())  # serialisable


def test_error_definition_is_relative_to_max_reference(logits: np.ndarray) -> None:
    scale = float(np.abs(logits).max())
    noisy = logits.copy()
    noisy[1, 2, 3] += 0.5e-3 * scale  # rel error 5e-4
    assert compare_func(atol=0, rtol=1e-3)({"logits": logits}, {"logits": noisy})
    result = compare_func(atol=0, rtol=1e-4)({"logits": logits}, {"logits": noisy})
    assert not result
    out = result.outputs["logits"]
    assert out.worst_index == [1, 2, 3]
    assert out.max_rel == pytest.approx(5e-4, rel=1e-3)
    assert "logits" in result.failures()[0] and "exceeds" in result.failures()[0]


def test_every_failing_output_is_listed(logits: np.ndarray) -> None:
    ref = {"logits": logits, "hidden": np.ones((3, 4), np.float32), "ok": np.zeros(2, np.float32)}
    cand = {"logits": logits + 1.0, "hidden": np.full((3, 4), 2.0, np.float32), "ok": np.zeros(2, np.float32)}
    result = compare_func()(ref, cand)
    assert not result
    failing = {line.split(":")[0] for line in result.failures()}
    assert failing == {"logits", "hidden"}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_never_passes(logits: np.ndarray, bad: float) -> None:
    cand = logits.copy()
    cand[0, 0, 0] = bad
    # Even an infinite tolerance must not accept NaN/Inf.
    result = compare_func(atol=np.inf, rtol=np.inf)({"logits": logits}, {"logits": cand})
    assert not result
    out = result.outputs["logits"]
    assert out.nan_count + out.inf_count == 1
    # ... and a non-finite reference fails too.
    assert not compare_func(atol=np.inf, rtol=np.inf)({"logits": cand}, {"logits": logits})


def test_empty_comparisons_never_pass() -> None:
    assert not compare_func()({}, {})
    empty = np.zeros((0, 4), np.float32)
    result = compare_func(atol=1, rtol=1)({"logits": empty}, {"logits": empty})
    assert not result and "empty" in result.failures()[0]


def test_shape_mismatch_and_missing_output_fail(logits: np.ndarray) -> None:
    result = compare_func(atol=1, rtol=1)({"logits": logits}, {"logits": logits[:, :4]})
    assert not result and "shape mismatch" in result.failures()[0]
    result = compare_func(atol=1, rtol=1)({"logits": logits}, {"other": logits})
    assert not result and "missing" in result.failures()[0]


def test_dtype_kind_mismatch_fails(logits: np.ndarray) -> None:
    result = compare_func(atol=1, rtol=1)({"logits": logits}, {"logits": logits.astype(np.int64)})
    assert not result and "dtype" in result.failures()[0]


def test_per_output_override(logits: np.ndarray) -> None:
    ref = {"logits": logits, "aux": np.ones(4, np.float32)}
    cand = {"logits": logits, "aux": np.full(4, 1.01, np.float32)}
    assert not compare_func(atol=0, rtol=1e-4)(ref, cand)
    assert compare_func(atol=0, rtol=1e-4, per_output={"aux": Tolerance(0, 2e-2)})(ref, cand)


def test_top1_gate(logits: np.ndarray) -> None:
    cand = logits.copy()
    pos = np.unravel_index(np.argmin(cand[0, 0]), cand[0, 0].shape)
    cand[0, 0][pos] = 100.0  # changes argmax at one of 10 positions
    loose = compare_func(atol=1e3, rtol=0)({"logits": logits}, {"logits": cand})
    assert loose and loose.outputs["logits"].top1_agreement == pytest.approx(0.9)
    gated = compare_func(atol=1e3, rtol=0, min_top1=0.99)({"logits": logits}, {"logits": cand})
    assert not gated and "top-1" in gated.failures()[0]


def test_tolerance_rejects_negative() -> None:
    with pytest.raises(ValueError):
        Tolerance(-1.0, 0.0)


# --- routing flips: margins, bounds, op check ------------------------------------------------------


def test_selection_mask() -> None:
    ids = np.array([[0, 2], [1, 3]])
    gates = np.array([[0.6, 0.4], [1.0, 0.0]])  # token 1 keeps only expert 1 (top-p style zero gate)
    assert selection_mask(ids, gates, 4).tolist() == [[True, False, True, False], [False, True, False, False]]


def test_topk_margin_and_bound_by_hand() -> None:
    probs = np.array([[0.5, 0.1, 0.3, 0.1]])
    margin, bound = margins_and_bounds(Decision("topk", top_k=2), probs, np.array([0.01]))
    assert margin == pytest.approx([0.3 - 0.1])
    softmax = (4 + 3) * 2.0**-24  # the fp32 softmax's own roundings (E + 3), relative
    assert bound == pytest.approx([(0.3 + 0.1) * (np.exp(0.02) - 1 + softmax)])  # probabilities within exp(+-2d)


def test_top_p_margin_looks_at_both_sides_of_the_threshold() -> None:
    # cumulative 0.5, 0.79997, 0.95, 1.0 with top_p 0.8: the second expert is admitted 2.7e-5 below the threshold
    # (the MoE-PEFT top-p case of issue 20), the third refused 0.15 above it.
    probs = np.array([[0.5, 0.29997, 0.15003, 0.05]])
    margin, bound = margins_and_bounds(Decision("top_p", top_p=0.8), probs, np.array([1e-4]))
    assert margin == pytest.approx([0.8 - 0.79997], abs=1e-9)
    assert bound == pytest.approx([0.79997 * (np.exp(2e-4) - 1 + 7 * 2.0**-24)])
    margin, _ = margins_and_bounds(Decision("top_p", top_p=0.8), np.array([[0.5, 0.1, 0.25, 0.15]]), np.zeros(1))
    assert margin == pytest.approx([0.85 - 0.8])  # refused side: c_2 = 0.75 <= 0.8 admits the third, c_3 = 0.85
    dense, _ = margins_and_bounds(Decision("dense"), probs, np.zeros(1))
    assert np.isinf(dense).all()


def _layout() -> TokenLayout:
    return TokenLayout("2x1", 1)


def test_flip_within_rounding_passes_and_a_real_one_fails() -> None:
    weight = np.eye(3)  # logits = x: the drift bound is sum |x_c - x_r| + KAPPA u |x_c| per expert
    probs = np.array([[0.40, 0.35, 0.25], [0.34, 0.33, 0.33]], dtype=np.float32)
    reference = UnitCapture(None, np.array([[0], [0]]), np.ones((2, 1)), probs)
    chosen = selection_mask(np.array([[1], [1]]), None, 3)  # both tokens chose expert 1
    x_c = np.zeros((2, 3))
    x_r = np.array([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0]])  # token 1's input drifted: its 0.01 margin is explained
    flips, tokens = judge_flips(
        "u", Decision("topk", top_k=1), chosen, reference, weight, x_c, x_r, 2.0**-11, _layout()
    )
    assert tokens == 2 and [f.near_tie for f in flips] == [False, True]
    assert flips[0].margin == pytest.approx(0.05) and flips[0].bound < 1e-3
    unit = UnitComparison("u")
    unit.add_flips(flips, tokens, same_input=False)
    assert not unit.passed and "row 0 position 0" in unit.messages[0] and unit.flip_count == 2


def test_padding_tokens_are_not_judged() -> None:
    reference = UnitCapture(None, np.array([[0], [0]]), np.ones((2, 1)), np.array([[0.9, 0.1], [0.9, 0.1]]))
    chosen = selection_mask(np.array([[0], [1]]), None, 2)  # token 1 (padding) flipped with margin 0.8
    layout = TokenLayout("1x2", 2, np.array([True, False]))
    flips, tokens = judge_flips(
        "u", Decision("topk", top_k=1), chosen, reference, np.eye(2), np.zeros((2, 2)), None, 0.0, layout
    )
    assert tokens == 1 and flips == []


def test_op_check_names_a_wrong_weight() -> None:
    import torch

    from moe_export.ops.grouped_lora import grouped_lora_dense

    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(6, 8, generator=g), torch.randn(4, 2, 8, generator=g), torch.randn(4, 5, 2, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2], [1, 3]])
    gates = torch.rand(6, 2, generator=g)
    y = grouped_lora_dense(x, ids, gates, a, b)
    good = UnitCapture(x.numpy(), ids.numpy(), gates.numpy(), output=y.numpy())
    unit = UnitComparison("u")
    unit.add_op_check(good, a, b, Tolerance(1e-6, 1e-4), "u")
    assert unit.passed and unit.op_max_abs is not None and unit.op_max_abs < 1e-5
    wrong_b = b.clone()
    wrong_b[2, 1, 0] += 1.0
    unit = UnitComparison("u")
    unit.add_op_check(good, a, wrong_b, Tolerance(1e-6, 1e-4), "u")
    assert not unit.passed and "GroupedLoRA node u differs" in unit.messages[0]


def test_match_unit() -> None:
    units = {"model.layers.0.mlp", "model.layers.0.self_attn.q_proj"}
    assert match_unit("model.layers.0.self_attn.q_proj", units) == "model.layers.0.self_attn.q_proj"
    assert match_unit("model.layers.0.mlp.gate_proj", units) == "model.layers.0.mlp"
    assert match_unit("model.layers.0.mlp#3", units) == "model.layers.0.mlp"
    assert node_index("model.layers.0.mlp#3") == 2 and node_index("model.layers.0.mlp") == 0
    assert match_unit("model.layers.1.mlp", units) is None


def test_no_flip_where_nothing_is_decided() -> None:
    """Dense routing decides nothing (a gate crossing the 1e-6 selection threshold is no flip), and a top-k choice is
    its ids, however small a renormalised gate (issue 20: the loramoe fp16 export failed on 'margin inf')."""
    ids = np.array([[0, 1, 2]])
    probs = np.array([[0.6, 0.4 - 9e-7, 9e-7]])
    reference = UnitCapture(None, ids, probs, probs)
    crossed = selection_mask(ids, np.array([[0.6, 0.4, 1.1e-6]]), 3)  # the candidate's gate rounded up across 1e-6
    flips, tokens = judge_flips(
        "u", Decision("dense"), crossed, reference, np.eye(3), np.zeros((1, 3)), None, 0.0, _layout()
    )
    assert flips == [] and tokens == 1
    top2 = UnitCapture(None, np.array([[0, 2]]), np.array([[1.0 - 1e-9, 1e-9]]), np.array([[0.5, 0.1, 0.4]]))
    chosen = selection_mask(np.array([[0, 2]]), None, 3)
    flips, _ = judge_flips(
        "u", Decision("topk", top_k=2), chosen, top2, np.eye(3), np.zeros((1, 3)), None, 0.0, _layout()
    )
    assert flips == []
